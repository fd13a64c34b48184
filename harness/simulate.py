"""`tandem simulate`'s model: the time of one training step on a cluster Tandem cannot run.

One pipeline (data-parallel replicas are symmetric) is replayed with harness.schedule's action
lists and event simulator; each virtual stage's F / B / W time comes from a cost model of the
layers on the target GPU (GEMM efficiency by size, attention and element-wise rates, all in the
cluster TOML), tensor-parallel all-reduces are added inside the NVLink domain, pipeline messages
cost a latency and a bandwidth term, and the data-parallel gradient reduction is placed on the
simulated timeline (overlapping the last backward when the layout says so) before the optimizer
step. Validation points and the CLI live in harness.simulate_cli; network costs in netmodel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from harness import flops as flops_mod
from harness import netmodel as nm
from harness import schedule as sched
from harness.errors import ConfigError

ARCHS = ("gpt2", "llama")
ORDERS = ("tp,dp,pp", "tp,pp,dp")
COSTS_FILE = nm.SUITES / "simulate" / "costs.toml"


# ---- model --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Model:
    """A dense decoder-only transformer. gpt2: LayerNorm, biases, GELU MLP of 4C, tied head,
    learned positions; llama: RMSNorm, GQA (n_kv_head), SwiGLU of ffn_hidden, untied head."""

    name: str
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    n_positions: int
    n_kv_head: int = 0
    ffn_hidden: int = 0
    source: str = ""

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def layer_gemms(self) -> list:
        """(n, k) of the forward GEMMs of one layer, X[tokens, k] @ W[k, n]."""
        C = self.n_embd
        if self.arch == "gpt2":
            return [(3 * C, C), (C, C), (4 * C, C), (C, 4 * C)]
        kv = self.n_kv_head * self.head_size
        return [(C + 2 * kv, C), (C, C), (2 * self.ffn_hidden, C), (C, self.ffn_hidden)]

    def layer_params(self) -> int:
        C = self.n_embd
        if self.arch == "gpt2":
            return 12 * C * C + 13 * C
        return sum(n * k for n, k in self.layer_gemms()) + 2 * C

    def params(self) -> int:
        """All parameters (the untied llama head counted, position embeddings not)."""
        emb = self.vocab_size * self.n_embd * (1 if self.arch == "gpt2" else 2)
        return self.n_layer * self.layer_params() + emb + 2 * self.n_embd

    def flops_per_token(self, seq_len: int, convention: str = "tandem") -> float:
        """Training FLOPs per token; gpt2 through harness.flops (the number the engine's MFU
        uses), llama with the same rule: 6 x (layers + head) + 6 or 12 x L·T·C attention."""
        if self.arch == "gpt2":
            return flops_mod.flops_per_token(self.n_layer, self.n_embd, self.vocab_size,
                                             max(self.n_positions, seq_len), seq_len, convention)
        n = self.n_layer * self.layer_params() + self.vocab_size * self.n_embd + self.n_embd
        att = 6 if convention == "tandem" else 12
        return float(6 * n + att * self.n_layer * seq_len * self.n_embd)


def load_model(name: str) -> Model:
    path = nm.find_file("models", name)
    doc = nm.read_toml(path)
    top = nm.take(str(path), doc, {"model": (dict, ...)})
    where = f"{path}: model"
    m = nm.take(where, top["model"], {
        "name": (str, ...), "source": (str, ...), "arch": (str, ...), "n_layer": (int, ...),
        "n_embd": (int, ...), "n_head": (int, ...), "vocab_size": (int, ...),
        "n_positions": (int, ...), "n_kv_head": (int, 0), "ffn_hidden": (int, 0)})
    if m["arch"] not in ARCHS:
        raise ConfigError(f"{where}.arch = {m['arch']!r}: unknown value "
                          f"(allowed: {', '.join(ARCHS)})")
    nm.positive(where, n_layer=m["n_layer"], n_embd=m["n_embd"], n_head=m["n_head"],
                vocab_size=m["vocab_size"], n_positions=m["n_positions"])
    if m["n_embd"] % m["n_head"]:
        raise ConfigError(f"{where}.n_head = {m['n_head']}: must divide n_embd = {m['n_embd']}")
    if m["arch"] == "llama":
        nm.positive(where, n_kv_head=m["n_kv_head"], ffn_hidden=m["ffn_hidden"])
    return Model(**m)


# ---- engine cost assumptions (suites/simulate/costs.toml) ----------------------------------------


@dataclass(frozen=True)
class Costs:
    elementwise_bytes_per_c: float  # bytes per token per layer per unit of C, forward
    backward_elementwise_ratio: float  # backward element-wise bytes / forward
    logit_bytes: float  # bytes moved per token per vocabulary entry (loss forward + backward)
    optimizer_bytes_per_param: float
    grad_bytes: float  # bytes per gradient element in the data-parallel reduction
    attn_bwd_flops_ratio: float
    act_bytes: float  # bytes per activation element on the wire (bf16)
    at_scale_compute_eff: float  # compute throughput kept in jobs beyond one NVLink domain


def load_costs(path: Path = COSTS_FILE) -> Costs:
    doc = nm.read_toml(path)
    top = nm.take(str(path), doc, {"costs": (dict, ...)})
    spec = {k: (float, ...) for k in Costs.__dataclass_fields__}
    spec.update({k + "_source": (str, ...) for k in Costs.__dataclass_fields__})
    c = nm.take(f"{path}: costs", top["costs"], spec)
    vals = {k: c[k] for k in Costs.__dataclass_fields__}
    nm.positive(f"{path}: costs", **vals)
    nm.fraction(f"{path}: costs", at_scale_compute_eff=vals["at_scale_compute_eff"])
    return Costs(**vals)


# ---- a job: model x cluster x layout ------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One step's description. microbatches M per pipeline, microbatch_size sequences each;
    global batch = dp x M x microbatch_size sequences of seq_len tokens."""

    model: Model
    cluster: nm.Cluster
    tp: int = 1
    pp: int = 1
    dp: int = 1
    chunks: int = 1
    schedule: str = "1f1b"
    microbatches: int = 1
    microbatch_size: int = 1
    seq_len: int = 1024
    tp_overlap: float = 0.0  # share of tensor-parallel communication hidden under GEMMs
    dp_overlap: bool = True  # gradient reduction starts with the last backward (bucketed)
    sequence_parallel: bool = True  # element-wise work and activations sharded over tp
    distributed_optimizer: bool = True  # optimizer state and step sharded over dp
    order: str = "tp,dp,pp"  # placement, innermost first
    compute_scale: float = 1.0  # multiplies every compute time (calibration on a measured run)
    costs: Costs | None = None  # None: suites/simulate/costs.toml (filled in by check_job)

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def tokens(self) -> int:
        return self.dp * self.microbatches * self.microbatch_size * self.seq_len


def check_job(j: Job) -> Job:
    """Raise ConfigError naming the setting unless `j` is a layout the model can simulate;
    returns `j` with its costs loaded."""
    where = "layout"
    for k in ("tp", "pp", "dp", "chunks", "microbatches", "microbatch_size", "seq_len"):
        v = getattr(j, k)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{where}: {k} = {v!r}: must be an integer >= 1")
    if j.schedule not in sched.NAMES:
        raise ConfigError(f"{where}: schedule = {j.schedule!r}: unknown value "
                          f"(allowed: {', '.join(sched.NAMES)})")
    if j.order not in ORDERS:
        raise ConfigError(f"{where}: order = {j.order!r}: unknown (allowed: {', '.join(ORDERS)})")
    if j.tp > j.cluster.net.domain_size:
        raise ConfigError(f"{where}: tp = {j.tp} exceeds the NVLink domain of "
                          f"{j.cluster.net.domain_size} GPUs ({j.cluster.name}); HINT: tensor "
                          f"parallelism stays inside a domain")
    S = j.pp * j.chunks
    if S > j.model.n_layer + 2:
        raise ConfigError(f"{where}: pp x chunks = {S} virtual stages for {j.model.n_layer} "
                          f"layers ({j.model.name}); at most L + 2 (the first and last may hold "
                          f"only the embedding and the head)")
    if j.model.n_head % j.tp or (j.model.arch == "llama" and j.model.n_kv_head % j.tp
                                 and j.tp % j.model.n_kv_head):
        raise ConfigError(f"{where}: tp = {j.tp} does not divide {j.model.name}'s heads")
    if not 0 <= j.tp_overlap <= 1:
        raise ConfigError(f"{where}: tp_overlap = {j.tp_overlap!r}: must be in [0, 1]")
    if j.schedule != "interleaved" and j.chunks != 1:
        raise ConfigError(f"{where}: chunks = {j.chunks} needs schedule 'interleaved'")
    return j if j.costs is not None else replace(j, costs=load_costs())


def effective_scale(j: Job) -> float:
    """The multiplier on every compute time: the job's calibration, divided by the at-scale
    efficiency once the job spans more than one NVLink domain (costs.toml says where it comes
    from: the one-GPU runs it cannot be measured on are short and single-device)."""
    multi = j.gpus > j.cluster.net.domain_size
    return j.compute_scale / (j.costs.at_scale_compute_eff if multi else 1.0)


def parse_layout(text: str) -> dict:
    """'tp=8,pp=16,dp=128[,vp=2]' -> {'tp': 8, 'pp': 16, 'dp': 128, 'chunks': 2}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, val = part.partition("=")
        key = {"vp": "chunks"}.get(key.strip(), key.strip())
        if not sep or key not in ("tp", "pp", "dp", "chunks"):
            raise ConfigError(f"--layout {text!r}: {part!r} is not tp=N, pp=N, dp=N or vp=N")
        try:
            out[key] = int(val)
        except ValueError:
            raise ConfigError(f"--layout {text!r}: {key} = {val!r} is not an integer") from None
        if out[key] < 1:
            raise ConfigError(f"--layout {text!r}: {key} must be >= 1")
    return out


# ---- per-stage compute --------------------------------------------------------------------------


@dataclass(frozen=True)
class StageCost:
    f: float
    b: float
    w: float
    tp_f: float  # exposed tensor-parallel communication inside f
    tp_b: float


def layer_cost(j: Job) -> tuple:
    """(f, b, w, tp_comm_f, tp_comm_b) seconds of one transformer layer on one GPU for one
    micro-batch; tp_comm_* is the exposed part, already included in f and b."""
    m, gpu, c = j.model, j.cluster.gpu, j.costs
    tok = j.microbatch_size * j.seq_len
    gemm = sum(gpu.gemm_s(2.0 * tok * n * k / j.tp) for n, k in m.layer_gemms())
    att = gpu.attention_for(m.head_size)
    att_fwd = 2.0 * tok * j.seq_len * m.n_embd / j.tp  # causal: half of 4·T·C per token
    t_att_f = att_fwd / (gpu.peak_flops * att.fwd_eff)
    t_att_b = c.attn_bwd_flops_ratio * att_fwd / (gpu.peak_flops * att.bwd_eff)
    shard = j.tp if j.sequence_parallel else 1
    ew = c.elementwise_bytes_per_c * m.n_embd * tok / shard / (gpu.hbm_bytes_per_s * gpu.hbm_eff)
    tp_f = tp_b = 0.0
    if j.tp > 1:
        # Megatron TP: two all-reduces (or reduce-scatter + all-gather) of the layer's activation
        # per pass, forward and input-gradient backward; none in the weight-gradient pass
        nbytes = tok * m.n_embd * c.act_bytes
        one = nm.domain_allreduce_s(j.cluster.net, j.tp, nbytes)
        tp_f = tp_b = 2 * one * (1.0 - j.tp_overlap)
    s = effective_scale(j)
    f = s * (gemm + t_att_f + ew) + tp_f
    b = s * (gemm + t_att_b + c.backward_elementwise_ratio * ew) + tp_b
    w = s * gemm
    return f, b, w, tp_f, tp_b


def head_cost(j: Job) -> tuple:
    """(f, b, w) of the LM head and loss on the last virtual stage (vocabulary split over tp)."""
    m, gpu, c = j.model, j.cluster.gpu, j.costs
    tok = j.microbatch_size * j.seq_len
    g = gpu.gemm_s(2.0 * tok * m.vocab_size * m.n_embd / j.tp)
    ce = c.logit_bytes * tok * m.vocab_size / j.tp / (gpu.hbm_bytes_per_s * gpu.hbm_eff)
    s = effective_scale(j)
    return s * (g + ce / 2), s * (g + ce / 2), s * g


def stage_layers(j: Job) -> list:
    """Layers per virtual stage, as even as possible. Remainder layers go to the middle stages
    first and to the first and last stage last: those hold the embedding and the LM head, so
    with S = L + 2 stages they hold no layer (how Llama 3 balanced 126 layers over 128)."""
    S = j.pp * j.chunks
    q, r = divmod(j.model.n_layer, S)
    order = list(range(1, S - 1)) + [0, S - 1] if S > 2 else list(range(S))
    extra = set(order[:r])
    return [q + (1 if s in extra else 0) for s in range(S)]


def stage_costs(j: Job) -> list:
    lf, lb, lw, tf, tb = layer_cost(j)
    hf, hb, hw = head_cost(j)
    S = j.pp * j.chunks
    out = []
    for s, n in enumerate(stage_layers(j)):
        last = s == S - 1
        out.append(StageCost(n * lf + (hf if last else 0), n * lb + (hb if last else 0),
                             n * lw + (hw if last else 0), n * tf, n * tb))
    return out


# ---- the step -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """One simulated step. Times in seconds; the breakdown is of the critical rank (the one
    whose gradient reduction ends last) and sums to step_s."""

    job: Job
    step_s: float
    tokens_per_s: float
    mfu: float
    mfu_palm: float
    bubble: float  # engine definition: 1 - Σ busy / (P · pipeline makespan)
    breakdown: dict
    p2p_s: float
    dp_s: float  # the longest rank's gradient reduction, all chunks, if nothing overlapped
    dp_algorithm: str
    optimizer_s: float
    sim: sched.Simulation


def _neighbour_in_domain(j: Job) -> bool:
    """Are pipeline neighbours in one NVLink domain? Their distance is the product of the
    layout axes placed inside pp."""
    stride = j.tp * (j.dp if j.order == "tp,dp,pp" else 1)
    return stride * 2 <= j.cluster.net.domain_size and j.pp > 1


def _dp_placement(j: Job) -> tuple:
    """(dp ranks per NVLink domain, domains the dp group spans, GPUs between its members)."""
    stride = j.tp * (1 if j.order == "tp,dp,pp" else j.pp)
    D = j.cluster.net.domain_size
    local = max(1, min(j.dp, D // stride)) if stride <= D else 1
    extent = math.ceil(j.dp * stride / D)
    return local, extent, stride


def simulate_step(j: Job) -> Result:
    """Simulate one step of `j` (see the module docstring)."""
    j = check_job(j)
    m, net = j.model, j.cluster.net
    s = sched.generate(j.schedule, j.pp, j.microbatches, j.chunks)
    costs = stage_costs(j)
    tok = j.microbatch_size * j.seq_len
    shard = j.tp if j.sequence_parallel else 1
    act = tok * m.n_embd * j.costs.act_bytes / shard
    p2p = nm.p2p_s(net, act, _neighbour_in_domain(j), max(2, j.pp)) if j.pp > 1 else 0.0
    sim = sched.simulate(s, [c.f for c in costs], [c.b for c in costs], [c.w for c in costs],
                         comm=p2p)
    # data parallelism: each rank reduces the gradients of the parameters it holds, chunk by
    # chunk as each chunk's last backward runs (bucketed: a chunk's reduction may start with its
    # last backward and cannot end before it), one chunk after another on the rank's NIC
    layers = stage_layers(j)
    local, extent, stride = _dp_placement(j)
    shared = j.cluster.shared_device and j.pp > 1
    ends, params_rank, dp_times, algo = [], [], [], "none"
    for r in range(j.pp):
        iv = sim.intervals[r]
        last_end = iv[-1].end if iv else 0.0
        nic_free, total_dp, p_rank = 0.0, 0.0, 0.0
        chunks = []
        for st in (st for st in range(s.stages) if s.stage_to_rank[st] == r):
            p = layers[st] * m.layer_params() / j.tp
            if st == s.stages - 1:
                p += m.vocab_size * m.n_embd / j.tp
            if st == 0 and m.arch == "llama":
                p += m.vocab_size * m.n_embd / j.tp  # untied input embedding
            back = [x for x in iv if x.stage == st and x.kind in ("B", "BW", "W")]
            chunks.append((back[-1].end, back[-1].start, p))
            p_rank += p
        for done, began, p in sorted(chunks):
            t, algo_r = nm.dp_allreduce_s(net, j.dp, local, p * j.costs.grad_bytes, extent,
                                          stride)
            algo = algo_r if j.dp > 1 else algo
            ready = began if j.dp_overlap else last_end
            nic_free = max(done, max(nic_free, ready) + t)
            total_dp += t
        ends.append(max(last_end, nic_free))
        params_rank.append(p_rank)
        dp_times.append(total_dp)
    opt_params = max(params_rank) / (j.dp if j.distributed_optimizer else 1)
    t_opt = effective_scale(j) * opt_params * j.costs.optimizer_bytes_per_param / (
        j.cluster.gpu.hbm_bytes_per_s * j.cluster.gpu.hbm_eff)
    crit = max(range(j.pp), key=lambda r: ends[r])
    pipe_end = ends[crit]
    if shared:  # one device runs every rank's work one kernel at a time
        work = sum(sim.busy) + j.pp * t_opt
        step = max(pipe_end + t_opt, work / j.cluster.shared_device_eff)
    else:
        step = pipe_end + t_opt
    # breakdown of the critical rank
    iv = sim.intervals[crit]
    kinds = {"F": 0.0, "B": 0.0, "W": 0.0}
    stage_of = {st: costs[st] for st in range(s.stages)}
    tp_exp = 0.0
    for x in iv:
        d = x.end - x.start
        c = stage_of[x.stage]
        if x.kind == "F":
            kinds["F"] += d - c.tp_f
            tp_exp += c.tp_f
        elif x.kind == "W":
            kinds["W"] += d
        elif x.kind == "B":
            kinds["B"] += d - c.tp_b
            tp_exp += c.tp_b
        elif c.b + c.w > 0:  # BW: split by the stage's b : w
            kinds["B"] += c.b / (c.b + c.w) * d - c.tp_b
            kinds["W"] += c.w / (c.b + c.w) * d
            tp_exp += c.tp_b
    busy = sim.busy[crit]
    last_end = iv[-1].end if iv else 0.0
    breakdown = {
        "forward": kinds["F"], "backward_input": kinds["B"], "backward_weight": kinds["W"],
        "tp_comm_exposed": tp_exp, "pipeline_idle": last_end - busy,
        "dp_comm_exposed": pipe_end - last_end, "optimizer": t_opt,
        "shared_device_wait": step - pipe_end - t_opt,
    }
    tps = j.tokens / step
    # MFU against the GPUs used: one, when every rank shares it
    peak = (1 if j.cluster.shared_device else j.gpus) * j.cluster.gpu.peak_flops
    return Result(j, step, tps, m.flops_per_token(j.seq_len) * tps / peak,
                  m.flops_per_token(j.seq_len, "palm") * tps / peak, sim.bubble, breakdown,
                  p2p, max(dp_times), algo, t_opt, sim)


def amdahl(speedup: float, fraction: float) -> float:
    """Whole-step speedup when `fraction` of the step gets `speedup` times faster."""
    return 1.0 / ((1.0 - fraction) + fraction / speedup)


def amdahl_needed(target: float, fraction: float) -> float:
    """Speedup the `fraction` must get for the whole step to reach `target`; inf if it cannot
    (the ceiling 1 / (1 - fraction) is at or below the target)."""
    rest = 1.0 / target - (1.0 - fraction)
    return fraction / rest if rest > 1e-12 else math.inf  # at the ceiling: rounding, not room


__all__ = ["Model", "Job", "Result", "Costs", "load_model", "load_costs", "parse_layout",
           "check_job", "simulate_step", "stage_costs", "layer_cost", "amdahl", "amdahl_needed"]
