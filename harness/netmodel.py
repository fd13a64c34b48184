"""Cluster descriptions and the cost of moving bytes between GPUs, for `tandem simulate`.

A cluster TOML (suites/clusters/*.toml) names one GPU (peak FLOP/s, memory bandwidth, the achieved
fractions of them, each with its source) and one hierarchical network: an NVLink domain of
`domain_size` GPUs, one NIC per GPU into a rail-optimised fat tree. Collective costs are the
usual latency-bandwidth (alpha-beta) forms for ring and tree algorithms. This module measures
nothing and runs nothing; the strict TOML helpers here are shared with harness.simulate.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import ConfigError



def _suites_root() -> Path:
    """suites/ inside the installed package (the wheel puts it in harness/suites), else the
    source checkout's, as harness.config.suite_dirs looks them up."""
    pkg = Path(__file__).resolve().parent
    for d in (pkg / "suites", pkg.parent / "suites"):
        if (d / "clusters").is_dir():
            return d
    return pkg.parent / "suites"


SUITES = _suites_root()
ALGORITHMS = ("ring", "tree", "auto")

# ---- strict TOML tables -------------------------------------------------------------------------


def read_toml(path: Path) -> dict:
    """Parse a TOML file; a missing or malformed file is a ConfigError naming it."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: malformed TOML: {e}") from None


def take(where: str, table: Any, spec: dict) -> dict:
    """Check `table` against spec {key: (type, default)} (default `...` = required) and return
    the values. Unknown keys, missing keys and wrong types raise ConfigError with the key path.
    type: int, float (ints accepted), str, bool, list (of str), "ints" (a list of integers),
    "tables" (a list of tables) or dict (tables and dicts are left to the caller)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table, got {table!r}")
    unknown = sorted(set(table) - set(spec))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (allowed: {', '.join(spec)})")
    out = {}
    for key, (kind, default) in spec.items():
        if key not in table:
            if default is ...:
                raise ConfigError(f"{where}.{key}: missing (required)")
            out[key] = default
            continue
        v = table[key]
        ok = {
            int: isinstance(v, int) and not isinstance(v, bool),
            float: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
            str: isinstance(v, str), bool: isinstance(v, bool), dict: isinstance(v, dict),
            list: isinstance(v, list) and all(isinstance(x, str) for x in v),
            "tables": isinstance(v, list) and all(isinstance(x, dict) for x in v),
            "ints": isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool)
                                                for x in v),
        }[kind]
        if not ok:
            expected = {"tables": "a list of tables", "ints": "a list of integers"}.get(
                kind, getattr(kind, "__name__", kind))
            raise ConfigError(f"{where}.{key} = {v!r}: expected {expected}")
        out[key] = float(v) if kind is float else v
    return out


def positive(where: str, **values: float) -> None:
    for k, v in values.items():
        if not v > 0:
            raise ConfigError(f"{where}.{k} = {v!r}: must be > 0")


def fraction(where: str, **values: float) -> None:
    for k, v in values.items():
        if not 0 < v <= 1:
            raise ConfigError(f"{where}.{k} = {v!r}: must be in (0, 1]")


def find_file(kind: str, name: str) -> Path:
    """suites/<kind>/<name>.toml, or `name` itself when it is a path to a .toml file."""
    p = Path(name)
    if name.endswith(".toml") or "/" in name:
        if not p.is_file():
            raise ConfigError(f"{p}: no such {kind[:-1]} file")
        return p
    p = SUITES / kind / f"{name}.toml"
    if not p.is_file():
        have = sorted(q.stem for q in (SUITES / kind).glob("*.toml"))
        raise ConfigError(f"unknown {kind[:-1]} {name!r} (built-in: {', '.join(have)}; "
                          f"or a path to a .toml file)")
    return p


# ---- the cluster ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attention:
    """Achieved fraction of peak of the attention kernel at one head size (nearest is used)."""

    head_size: int
    fwd_eff: float
    bwd_eff: float  # counting backward FLOPs as 2.5 x forward
    source: str


@dataclass(frozen=True)
class GPU:
    name: str
    peak_flops: float  # dense bf16 FLOP/s (datasheet)
    hbm_bytes_per_s: float
    hbm_eff: float  # achieved fraction of hbm_bytes_per_s by fused element-wise kernels
    gemm_eff_max: float  # GEMM efficiency eff(g) = gemm_eff_max * g / (g + gemm_half_flops)
    gemm_half_flops: float  # g: FLOPs of one GEMM call
    attention: tuple
    sources: tuple

    def gemm_s(self, flops: float) -> float:
        """Seconds for one GEMM of `flops` FLOPs at the size-dependent efficiency."""
        if flops <= 0:
            return 0.0
        eff = self.gemm_eff_max * flops / (flops + self.gemm_half_flops)
        return flops / (self.peak_flops * eff)

    def attention_for(self, head_size: int) -> Attention:
        return min(self.attention, key=lambda a: (abs(a.head_size - head_size), a.head_size))


@dataclass(frozen=True)
class Network:
    domain_size: int  # GPUs per NVLink (scale-up) domain
    domain_bytes_per_s: float  # per GPU, one direction
    domain_latency_s: float
    nic_bytes_per_s: float  # per GPU, one direction (400 Gb/s = 50e9)
    nic_latency_s: float  # end to end through one leaf switch
    hop_latency_s: float  # each further switch hop (leaf-spine-core)
    leaf_domains: int  # domains under one leaf of a rail
    spine_domains: int  # domains under one spine (pod); beyond: core
    oversubscription: float  # bandwidth divisor between pods (1 = full bisection)
    domain_busbw_eff: float  # achieved fraction of link bandwidth by NCCL-class collectives
    nic_busbw_eff: float
    algorithm: str  # "ring", "tree" or "auto" (the cheaper) for inter-domain all-reduces


@dataclass(frozen=True)
class Cluster:
    name: str
    description: str
    gpu: GPU
    net: Network
    shared_device: bool  # every rank on one device (time-sliced): see harness.simulate
    shared_device_eff: float  # device throughput kept when ranks share it
    path: str


def load_cluster(name: str) -> Cluster:
    """Load suites/clusters/<name>.toml (or a path) strictly."""
    path = find_file("clusters", name)
    doc = read_toml(path)
    top = take(str(path), doc, {"cluster": (dict, ...), "gpu": (dict, ...),
                                "network": (dict, ...)})
    where = f"{path}: cluster"
    c = take(where, top["cluster"], {
        "name": (str, ...), "description": (str, ...), "sources": (list, ...),
        "shared_device": (bool, False), "shared_device_eff": (float, 1.0),
        "shared_device_eff_fitted_on": (str, "")})
    fraction(where, shared_device_eff=c["shared_device_eff"])
    where = f"{path}: gpu"
    g = take(where, top["gpu"], {
        "name": (str, ...), "peak_bf16_flops": (float, ...), "hbm_bytes_per_s": (float, ...),
        "hbm_eff": (float, ...), "gemm_eff_max": (float, ...), "gemm_half_flops": (float, ...),
        "gemm_source": (str, ...), "hbm_eff_source": (str, ...),
        "attention": ("tables", ...)})
    positive(where, peak_bf16_flops=g["peak_bf16_flops"], hbm_bytes_per_s=g["hbm_bytes_per_s"],
             gemm_half_flops=g["gemm_half_flops"])
    fraction(where, hbm_eff=g["hbm_eff"], gemm_eff_max=g["gemm_eff_max"])
    att = []
    for i, t in enumerate(g["attention"]):
        a = take(f"{where}.attention[{i}]", t, {"head_size": (int, ...), "fwd_eff": (float, ...),
                                                "bwd_eff": (float, ...), "source": (str, ...)})
        fraction(f"{where}.attention[{i}]", fwd_eff=a["fwd_eff"], bwd_eff=a["bwd_eff"])
        att.append(Attention(**a))
    if not att:
        raise ConfigError(f"{where}.attention: needs at least one entry")
    gpu = GPU(g["name"], g["peak_bf16_flops"], g["hbm_bytes_per_s"], g["hbm_eff"],
              g["gemm_eff_max"], g["gemm_half_flops"], tuple(att),
              (g["gemm_source"], g["hbm_eff_source"]))
    where = f"{path}: network"
    n = take(where, top["network"], {
        "domain_size": (int, ...), "domain_bytes_per_s": (float, ...),
        "domain_latency_s": (float, ...), "nic_bytes_per_s": (float, ...),
        "nic_latency_s": (float, ...), "hop_latency_s": (float, ...),
        "leaf_domains": (int, ...), "spine_domains": (int, ...),
        "oversubscription": (float, 1.0), "domain_busbw_eff": (float, ...),
        "nic_busbw_eff": (float, ...), "algorithm": (str, "auto"), "source": (str, ...)})
    if n["algorithm"] not in ALGORITHMS:
        raise ConfigError(f"{where}.algorithm = {n['algorithm']!r}: unknown value "
                          f"(allowed: {', '.join(ALGORITHMS)})")
    positive(where, domain_size=n["domain_size"], domain_bytes_per_s=n["domain_bytes_per_s"],
             nic_bytes_per_s=n["nic_bytes_per_s"], leaf_domains=n["leaf_domains"],
             spine_domains=n["spine_domains"], oversubscription=n["oversubscription"])
    fraction(where, domain_busbw_eff=n["domain_busbw_eff"], nic_busbw_eff=n["nic_busbw_eff"])
    n.pop("source")
    return Cluster(c["name"], c["description"], gpu, Network(**n), c["shared_device"],
                   c["shared_device_eff"], str(path))


# ---- collective costs ----------------------------------------------------------------------------
# n ranks, S bytes per rank (the full buffer for an all-reduce, the full output for an
# all-gather / input for a reduce-scatter), bw bytes/s per rank one way, a latency per step.


def ring_allreduce_s(n: int, nbytes: float, bw: float, lat: float) -> float:
    """Ring: reduce-scatter then all-gather, 2(n-1) steps of S/n bytes."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) * lat + 2 * (n - 1) / n * nbytes / bw


def ring_half_s(n: int, nbytes: float, bw: float, lat: float) -> float:
    """A ring reduce-scatter or all-gather: (n-1) steps of S/n bytes."""
    if n <= 1:
        return 0.0
    return (n - 1) * lat + (n - 1) / n * nbytes / bw


def tree_allreduce_s(n: int, nbytes: float, bw: float, lat: float) -> float:
    """Double binary tree (NCCL): pipelined reduce up and broadcast down; latency grows as
    2 log2 n, the bandwidth term is about 2 S / bw (each tree carries half at full link rate)."""
    if n <= 1:
        return 0.0
    return 2 * math.ceil(math.log2(n)) * lat + 2 * nbytes / bw


def fabric_latency_s(net: Network, domains: int) -> float:
    """Latency of one NIC message among `domains` NVLink domains on one rail: one leaf switch
    while they fit under a leaf, two more hops (up and down a spine) within a pod, four beyond."""
    hops = 0 if domains <= net.leaf_domains else (2 if domains <= net.spine_domains else 4)
    return net.nic_latency_s + hops * net.hop_latency_s


def nic_bw(net: Network, domains: int, stride: int = 1) -> float:
    """Achieved per-GPU NIC bandwidth of a collective among `domains` domains whose members sit
    `stride` GPUs apart. Within a pod (spine_domains) the tree is non-blocking. Beyond it, a
    ring laid out in placement order leaves each pod through one hop per group, and `stride`
    groups interleave there: they need stride x bw of the pod's uplink capacity
    pod GPUs x bw / oversubscription, so they slow down only when that is exceeded."""
    bw = net.nic_bytes_per_s * net.nic_busbw_eff
    if domains <= net.spine_domains or net.oversubscription <= 1:
        return bw
    pod_gpus = net.spine_domains * net.domain_size
    return bw / max(1.0, stride * net.oversubscription / pod_gpus)


def domain_allreduce_s(net: Network, n: int, nbytes: float) -> float:
    """All-reduce among n GPUs of one NVLink domain (tensor parallelism)."""
    return ring_allreduce_s(n, nbytes, net.domain_bytes_per_s * net.domain_busbw_eff,
                            net.domain_latency_s)


def p2p_s(net: Network, nbytes: float, same_domain: bool, domains: int = 2) -> float:
    """One point-to-point message (pipeline activation or its gradient)."""
    if same_domain:
        return net.domain_latency_s + nbytes / (net.domain_bytes_per_s * net.domain_busbw_eff)
    return fabric_latency_s(net, domains) + nbytes / nic_bw(net, domains)


def dp_allreduce_s(net: Network, n: int, local: int, nbytes: float, extent: int = 0,
                   stride: int = 1) -> tuple:
    """Data-parallel gradient all-reduce (or reduce-scatter + all-gather, the same bytes) over n
    ranks of which `local` share an NVLink domain: reduce-scatter inside the domain, all-reduce
    of S/local across n/local domains over the NICs (ring or tree), all-gather inside.
    `extent`: the domains the group's span covers (more than n/local when other layout axes sit
    between its members); it sets the switch tier reached; `stride`: GPUs between members
    (see nic_bw). Returns (seconds, algorithm)."""
    if n <= 1:
        return 0.0, "none"
    local = max(1, min(local, n))
    dom_bw = net.domain_bytes_per_s * net.domain_busbw_eff
    t_local = 2 * ring_half_s(local, nbytes, dom_bw, net.domain_latency_s)
    groups = math.ceil(n / local)
    if groups <= 1:
        return t_local, "ring (in domain)"
    reach = max(groups, extent)
    lat, bw = fabric_latency_s(net, reach), nic_bw(net, reach, stride)
    ring = ring_allreduce_s(groups, nbytes / local, bw, lat)
    tree = tree_allreduce_s(groups, nbytes / local, bw, lat)
    if net.algorithm == "ring" or (net.algorithm == "auto" and ring <= tree):
        return t_local + ring, "ring"
    return t_local + tree, "tree"


__all__ = ["Cluster", "GPU", "Network", "Attention", "load_cluster", "read_toml", "take",
           "find_file", "ring_allreduce_s", "ring_half_s", "tree_allreduce_s", "p2p_s",
           "dp_allreduce_s", "domain_allreduce_s", "fabric_latency_s", "nic_bw"]
