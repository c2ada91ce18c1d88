import pytest

from shoal.cluster.config import Config, config_from_dict, load_config, parse_bytes
from shoal.index.errors import ConfigError


def test_defaults_need_no_file():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.model.name == "all-MiniLM-L6-v2"
    assert cfg.scan.max_file_bytes == 20 << 20


@pytest.mark.parametrize("text,expected", [
    (123, 123), ("64K", 64 << 10), ("512M", 512 << 20), ("16G", 16 << 30), ("1.5GiB", int(1.5 * (1 << 30))),
    ("10 MB", 10 << 20),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["16X", "-1", "", True, 1.5, None])
def test_parse_bytes_rejects(bad):
    with pytest.raises(ConfigError, match="size"):
        parse_bytes(bad)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"model": {"nmae": "x"}})
    msg = str(e.value)
    assert "model.nmae" in msg and "max_seq_length" in msg and "batch_size" in msg


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match="unknown config key colour.*data_dir"):
        config_from_dict({"colour": 1})


@pytest.mark.parametrize("data,key", [
    ({"model": {"batch_size": "big"}}, "model.batch_size"),
    ({"model": {"batch_size": True}}, "model.batch_size"),
    ({"model": {"batch_size": 0}}, "model.batch_size"),
    ({"model": {"device": "tpu"}}, "model.device"),
    ({"chunk": {"tokens": 100, "overlap_tokens": 100}}, "chunk.overlap_tokens"),
    ({"scan": {"max_file_bytes": "lots"}}, "scan.max_file_bytes"),
    ({"scan": {"ignore": "*.log"}}, "scan.ignore"),
    ({"index": {"nprobe": -3}}, "index.nprobe"),
    ({"embed": {"cpus_per_actor": 0}}, "embed.cpus_per_actor"),
    ({"ray": {"address": 5}}, "ray.address"),
    ({"model": "x"}, "model"),
])
def test_bad_values_name_the_key(data, key):
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert key in str(e.value)


def test_yaml_file_and_env_override(tmp_path, monkeypatch):
    p = tmp_path / "c.yaml"
    p.write_text("data_dir: /somewhere\nindex:\n  factory: IVF64,Flat\nscan:\n  max_file_bytes: 1M\n")
    monkeypatch.delenv("SHOAL_DATA_DIR", raising=False)
    cfg = load_config(p)
    assert cfg.data_dir == "/somewhere" and cfg.index.factory == "IVF64,Flat"
    assert cfg.scan.max_file_bytes == 1 << 20
    monkeypatch.setenv("SHOAL_DATA_DIR", str(tmp_path / "env"))
    assert load_config(p).data_dir == str(tmp_path / "env")
    assert load_config(p, data_dir="cli").data_dir == "cli"


def test_bad_yaml_and_missing_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    p.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


def test_shipped_configs_load():
    from pathlib import Path

    shipped = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    names = {p.name for p in shipped}
    assert {"local.yaml", "test.yaml", "cluster.yaml"} <= names
    for p in shipped:
        if p.name != "runtime_env.yaml":  # Ray's runtime env for `ray job submit`, not a shoal config
            load_config(p)


def test_query_encoder_placement():
    from shoal.cluster.app import encoder_placement

    assert encoder_placement("auto", 0.25, 0) == ("cpu", 0.0)  # CPU-only machine: nothing changes
    assert encoder_placement("auto", 0.25, 2) == ("cuda", 0.25)  # shares a card with a ShardSearcher
    assert encoder_placement("cpu", 0.25, 2) == ("cpu", 0.0)
    assert encoder_placement("cuda", 0.5, 0) == ("cpu", 0.0)  # asked for, but no GPU: a warning, the CPU


def test_searchers_leave_room_for_the_encoder_on_a_card():
    from shoal.cluster.app import searcher_gpus

    assert searcher_gpus(1.0, 0.25) == 0.75  # 2 groups x 0.75 + 0.25 fit 2 cards
    assert 2 * searcher_gpus(1.0, 0.25) + 0.25 <= 2
    assert searcher_gpus(1.0, 0.0) == 1.0  # encoder on the CPU: a whole card each
    assert searcher_gpus(0.0, 0.25) == 0.0  # searchers on the CPU


def test_deploy_failure_names_the_failed_deployment_and_node():
    from types import SimpleNamespace as NS

    from shoal.cluster.app import deploy_failure

    tb = ("The deployment failed to start 3 times in a row. Error:\nTraceback (most recent call last):\n"
          "  File \"x.py\", line 1\nRuntimeError: ShardSearcher1 on node 10.0.0.2: cannot load generation 000004: "
          "shard_01.index: received 10 bytes with sha256 abc, the manifest says 12 bytes with def: refused\n")
    app = NS(status="ApplicationStatus.DEPLOY_FAILED", message="", deployments={
        "QueryEncoder": NS(status="DeploymentStatus.UPDATING", message="waiting"),
        "ShardSearcher1": NS(status="DeploymentStatus.DEPLOY_FAILED", message=tb),
        "Ingress": NS(status="DeploymentStatus.HEALTHY", message="")})
    line = deploy_failure(app, timed_out=False, timeout_s=300)
    assert "\n" not in line and line.startswith("deployment ShardSearcher1 failed: ShardSearcher1 on node 10.0.0.2:")
    assert "shard_01.index" in line
    stuck = NS(status="ApplicationStatus.DEPLOYING", message="", deployments={
        "ShardSearcher0": NS(status="DeploymentStatus.UPDATING", message=(
            "Deployment 'ShardSearcher0' has 1 replicas that have taken more than 30s to be scheduled. "
            "Resources required for each replica: {\"CPU\": 0.2, \"GPU\": 1.0}, total resources available: {}."))})
    line = deploy_failure(stuck, timed_out=True, timeout_s=120)
    assert line == ('deployment ShardSearcher0 failed: not running after 120 s: no node has the resources it asks '
                    'for {"CPU": 0.2, "GPU": 1.0}')


def test_ingress_placement_is_checked():
    from shoal.cluster.config import ConfigError, config_from_dict

    assert config_from_dict({"serve": {"ingress": "10.0.0.2"}}).serve.ingress == "10.0.0.2"
    with pytest.raises(ConfigError, match="serve.ingress"):
        config_from_dict({"serve": {"ingress": "somewhere else"}})


def test_local_yaml_is_the_built_in_default():
    """configs/local.yaml says every key in it is the built-in default: keep the two in step."""
    from pathlib import Path

    from shoal.cluster.config import Config

    local = load_config(Path(__file__).resolve().parents[2] / "configs" / "local.yaml")
    assert local == Config()


def test_local_yaml_lists_every_key():
    """configs/local.yaml lists every config key (the README says so): a key added to the config without
    its line there fails here, naming it."""
    import dataclasses
    from pathlib import Path

    import yaml

    from shoal.cluster.config import Config

    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "local.yaml").read_text())

    def missing(cls: type, node: dict, prefix: str) -> list[str]:
        out = []
        for f in dataclasses.fields(cls):
            key = prefix + f.name
            if f.name not in node:
                out.append(key)
            elif dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING
                                          else f.default):
                sub = f.default_factory if f.default_factory is not dataclasses.MISSING else type(f.default)
                out += missing(sub, node[f.name] or {}, key + ".")
        return out

    assert missing(Config, raw, "") == []
