// shoal's search page, a little better with JavaScript: searches and passage views are fetched and swapped
// in, and where the server wants a bearer token it is asked for once and kept for this tab (sessionStorage),
// sent as a header, never put in an address. Without JavaScript the plain form and links work as they are.
(function () {
  "use strict";
  var KEY = "shoal-token";
  var latest = 0;  // only the newest load's answer is shown: an older one that comes back late is dropped

  function token() {
    try { return sessionStorage.getItem(KEY) || ""; } catch (e) { return ""; }
  }

  function setToken(t) {
    try { if (t) { sessionStorage.setItem(KEY, t); } else { sessionStorage.removeItem(KEY); } } catch (e) { /* private mode */ }
  }

  function swap(doc, id) {
    var now = document.getElementById(id), next = doc.getElementById(id);
    if (now && next) { now.replaceWith(document.importNode(next, true)); }
  }

  function load(url, push) {
    var headers = { "accept": "text/html" }, sent = token(), mine = ++latest;
    if (sent) { headers.authorization = "Bearer " + sent; }
    return fetch(url, { headers: headers, credentials: "same-origin" }).then(function (r) {
      return r.text().then(function (html) {
        if (mine !== latest) { return; }
        var doc = new DOMParser().parseFromString(html, "text/html");  // inert: nothing in it runs
        if (!doc.getElementById("main")) { window.location.assign(url); return; }
        if (r.status === 401 && token() === sent) { setToken(""); }
        swap(doc, "main");
        swap(doc, "status");
        document.title = doc.title;
        if (push) { history.pushState(null, "", url); }
        wire();
        var target = window.location.hash && document.getElementById(window.location.hash.slice(1));
        if (target) { target.scrollIntoView(); }
      });
    }).catch(function () { window.location.assign(url); });
  }

  function wire() {
    var main = document.getElementById("main");
    if (!main) { return; }
    var tf = document.getElementById("token-form");
    if (tf) {
      tf.hidden = false;
      tf.addEventListener("submit", function (e) {
        e.preventDefault();
        if (tf.getAttribute("aria-busy") === "true") { return; }  // one try at a time: its answer replaces the form
        tf.setAttribute("aria-busy", "true");
        tf.elements.token.readOnly = true;
        setToken(tf.elements.token.value);
        load(window.location.href, false);
      });
      tf.elements.token.focus();
    }
    var form = main.querySelector("form.search");
    if (form) {
      form.addEventListener("submit", function (e) {
        e.preventDefault();
        var params = new URLSearchParams(new FormData(form));
        load("/?" + params.toString(), true).then(function () {
          var results = document.getElementById("results");
          if (results) { results.setAttribute("aria-live", "polite"); }
        });
      });
    }
    main.querySelectorAll("a[href^='/passage/'], a[href^='/text/'], nav a").forEach(function (a) {
      a.addEventListener("click", function (e) {
        if (!token() || e.ctrlKey || e.metaKey || e.shiftKey) { return; }  // plain navigation works without one
        e.preventDefault();
        load(a.href, true);
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var main = document.getElementById("main");
    if (main && main.dataset.needsToken && token()) { load(window.location.href, false); } else { wire(); }
  });
  window.addEventListener("popstate", function () { load(window.location.href, false); });
}());
