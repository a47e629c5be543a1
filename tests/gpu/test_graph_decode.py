"""GraphDecoder (minisparse.kernels.decode_cuda): the CUDA-graph decode step against the NumPy model.

On small awkward shapes (dim 40, ffn 70, 5 query heads on 1 KV head, odd layer counts,
qkv bias, Gemma's norm offset and embedding scale, tied and untied heads):

* graph replay == eager kernels == NumPy greedy tokens, in float32 weights, logits to
  float32 rounding against a float64 reference;
* float16 weights: logits close to a float64 reference run on the same half-rounded
  weights, tokens identical;
* on exactly sparse models: skip and given-active modes == dense == NumPy tokens, and the
  dense step counts exactly the constructed number of nonzero neurons per position and
  layer.

Marked ``gpu`` where a GPU is needed: they skip (never pass) without CuPy or a device.
The input checks that need no GPU run everywhere.
"""
from __future__ import annotations

import numpy as np
import pytest
from helpers import load_bench

import minisparse as ms
from minisparse.activations import get_activation
from minisparse.kernels import decode_cuda as dc
from minisparse.kernels.decode_cuda import GraphDecoder, exactly_sparse_params
from minisparse.model import KVCache


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
CONFIGS = {
    # dim 40, 5 query heads on 1 KV head (Dh 8), ffn 70, 3 layers (odd), untied
    "d40-gqa5/1-drelu": dict(dim=40, n_layers=3, n_heads=5, n_kv_heads=1, ffn_dim=70, vocab_size=97,
                             activation="drelu", tie_embeddings=False),
    # qkv bias (Qwen2), tied, plain relu, Dh 12, ffn 33
    "d48-bias-relu": dict(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=33, vocab_size=61,
                          activation="relu", qkv_bias=True),
    # Gemma: head_dim set apart (2 x 16 != 24), norm offset, embedding scale, reglu
    "d24-gemma-reglu": dict(dim=24, head_dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=50, vocab_size=61,
                            activation="reglu", norm_offset=True, embed_scale=True),
    # a non-sparse activation (the FFN is dense; skip mode must still be exact), 7 layers
    "d33x2-swiglu": dict(dim=66, n_layers=7, n_heads=3, n_kv_heads=3, ffn_dim=7, vocab_size=33,
                         activation="swiglu", tie_embeddings=False),
}
PROMPT = [3, 1, 4, 1, 5, 9, 2]
NEW = 10


def random_params(cfg, seed, pow2_norms=False):
    """float64 parameters with O(1) activations (larger than the init, so logits spread).

    ``pow2_norms``: RMSNorm weights (their scale) in {1/2, 1, 2}, so that the decoder's
    folding of them into float16 weight rows is exact and the float16 check stays tight.
    """
    rng = np.random.default_rng(seed)
    p = {}
    for name, shape in ms.Transformer.param_shapes(cfg).items():
        if name.endswith("norm"):
            scale = rng.choice([0.5, 1.0, 2.0], size=shape) if pow2_norms else rng.uniform(0.5, 1.5, shape)
            w = scale - (1.0 if cfg.norm_offset else 0.0)
        elif name.split(".")[-1] in ("bq", "bk", "bv"):
            w = rng.normal(0.0, 0.3, shape)
        else:
            w = rng.normal(0.0, 1.0 / np.sqrt(shape[0] if name.endswith(("wq", "wk", "wv", "wo")) else shape[-1]),
                           shape)
        p[name] = w
    return p


def to_device(cp, model):
    """The model on the GPU: model.to("cupy") where the model has it, else a copy with CuPy params."""
    if hasattr(model, "to"):
        moved = model.to("cupy")
        return moved if moved is not None else model
    return ms.Transformer(model.config, params={k: cp.asarray(v) for k, v in model.params.items()})


def reference(model, prompt, n_new):
    """NumPy greedy decode: new ids and the logits (n_new, V) that chose them."""
    cache = KVCache(model.config, 1, model.dtype, max_len=len(prompt) + n_new)
    logits = model(np.array([prompt]), cache=cache)[0, -1]
    ids, out = [], []
    for _ in range(n_new):
        out.append(np.asarray(logits, dtype=np.float64))
        ids.append(int(np.argmax(logits)))
        logits = model(np.array([[ids[-1]]]), cache=cache)[0, -1]
    return ids, np.stack(out)


def assert_logits_close(got, want, rtol, what):
    scale = np.abs(want).max()
    err = np.abs(got - want).max() / scale
    assert err <= rtol, f"{what}: max |logits - ref| / max |ref| = {err:.2e} > {rtol:.0e}"


def models(cfg_kw, seed, weights_f16=False, sparse=False, max_seq_len=64):
    cfg = ms.ModelConfig(max_seq_len=max_seq_len, **cfg_kw)
    if sparse:
        p, active = exactly_sparse_params(cfg, sparsity=0.8, seed=seed, dtype=np.float64)
    else:
        p, active = random_params(cfg, seed, pow2_norms=weights_f16), None
    if weights_f16:                                 # the reference sees the same half-rounded weights
        p = {k: (v.astype(np.float16).astype(np.float64) if not k.endswith("norm") else v) for k, v in p.items()}
    ref = ms.Transformer(cfg, params=p)                                     # float64 truth
    dev = ms.Transformer(cfg, params={k: v.astype(np.float32) for k, v in p.items()})
    return cfg, ref, dev, active


# --------------------------------------------------------------------------------------
# graph == eager == NumPy
# --------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("mode", ["dense", "skip", "given", "skip/fused", "given/fused", "skip/split", "given/split"])
def test_graph_equals_eager_equals_numpy_fp32(cp, name, mode):
    mode, _, kernel = mode.partition("/")
    cfg, ref, dev, _ = models(CONFIGS[name], seed=len(name))
    want_ids, want_logits = reference(ref, PROMPT, NEW)
    act = get_activation(cfg.activation)
    if mode != "dense" and not act.exact_zeros:
        pytest.skip(f"{cfg.activation} has no exact zeros to skip")
    active = [np.arange(cfg.ffn_dim)] * cfg.n_layers if mode == "given" else None   # every neuron: dense
    dec = GraphDecoder(to_device(cp, dev), mode=mode, weight_dtype="float32", active=active,
                       sparse_kernel=kernel or "decode")
    for graph in (False, True, True):              # eager, then the graph twice (capture, then reuse)
        ids, logits = dec.generate(PROMPT, NEW, graph=graph, return_logits=True)
        assert ids == want_ids, f"{name} {mode} graph={graph}: {ids} != NumPy {want_ids}"
        assert_logits_close(logits, want_logits, 1e-4, f"{name} {mode} graph={graph}")
    # without the per-step reads, and from another prompt: nothing read back until the end
    ids2 = dec.generate(PROMPT[:3], NEW)
    assert ids2 == reference(ref, PROMPT[:3], NEW)[0]
    assert dec.n_launches > 4 * cfg.n_layers


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["d40-gqa5/1-drelu", "d24-gemma-reglu", "d33x2-swiglu"])
def test_fp16_weights_logits_close(cp, name):
    cfg, ref, dev, _ = models(CONFIGS[name], seed=7, weights_f16=True)
    want_ids, want_logits = reference(ref, PROMPT, NEW)
    dec = GraphDecoder(to_device(cp, dev), mode="dense", weight_dtype="float16")
    ids, logits = dec.generate(PROMPT, NEW, return_logits=True)
    # half weights read exactly; float32 activations and sums against float64: rounding only
    assert_logits_close(logits, want_logits, 1e-4, f"{name} fp16")
    assert ids == want_ids


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["d40-gqa5/1-drelu", "d48-bias-relu", "d24-gemma-reglu"])
@pytest.mark.parametrize("wdt", ["float32", "float16"])
def test_modes_agree_on_exactly_sparse_model(cp, name, wdt):
    cfg, ref, dev, active = models(CONFIGS[name], seed=3, weights_f16=(wdt == "float16"), sparse=True)
    want_ids, want_logits = reference(ref, PROMPT, NEW)
    n_active = int(round(0.2 * cfg.ffn_dim))
    dmodel = to_device(cp, dev)
    dense = GraphDecoder(dmodel, mode="dense", weight_dtype=wdt, count_active=True)
    ids = dense.generate(PROMPT, NEW)
    steps = len(PROMPT) + NEW - 1
    counts = dense.counts.get()[:steps]
    assert (counts == n_active).all(), f"nonzero neurons per (position, layer) {np.unique(counts)} != {n_active}"
    assert (dense.counts.get()[steps:] == 0).all()
    assert ids == want_ids
    skip = GraphDecoder(dmodel, mode="skip", weight_dtype=wdt, count_active=True)
    assert skip.generate(PROMPT, NEW) == want_ids
    counts = skip.counts.get()
    assert (counts[:steps] == n_active).all(), f"kept neurons per (position, layer) {np.unique(counts[:steps])}"
    assert (counts[steps:] == 0).all()
    for mode in ("skip", "given"):
        for kernel in ("decode", "fused", "split"):
            dec = GraphDecoder(dmodel, mode=mode, weight_dtype=wdt, active=active if mode == "given" else None,
                               sparse_kernel=kernel)
            got, logits = dec.generate(PROMPT, NEW, return_logits=True)
            assert got == want_ids, f"{mode} {kernel}: {got} != {want_ids}"
            assert_logits_close(logits, want_logits, 1e-4, f"{name} {mode} {kernel} {wdt}")


@pytest.mark.gpu
@pytest.mark.parametrize("pdl,prefetch,early", [(False, 0, False), (True, 0, False), (True, 128, False),
                                                (True, 4096, False), (False, 0, True), (True, 0, True),
                                                (True, 512, True)])
@pytest.mark.parametrize("wdt", ["float32", "float16"])
def test_programmatic_dependent_launch_keeps_every_mode_exact(cp, pdl, prefetch, early, wdt):
    """The graph captured with programmatic dependent launch (kernels start before the one
    before them ends, prefetch weights or load their first rows early, wait) gives the
    NumPy tokens in every mode, replayed many times, and the same logits as plain launches
    and as the eager kernels."""
    cfg, ref, dev, active = models(CONFIGS["d40-gqa5/1-drelu"], seed=5, weights_f16=(wdt == "float16"), sparse=True)
    want_ids, want_logits = reference(ref, PROMPT, NEW)
    dmodel = to_device(cp, dev)
    major = int(cp.cuda.Device().compute_capability) // 10
    rungs = [("dense", {}), ("skip", {}), ("given", {}),                # the defaults, then the other rungs
             ("skip", dict(select_kernel="single")), ("skip", dict(select_kernel="pair")),
             ("skip", dict(select_kernel="split3pair")), ("skip", dict(select_kernel="block")),
             ("skip", dict(select_kernel="block8")), ("skip", dict(select_kernel="split3")),
             ("skip", dict(select_kernel="block8e")), ("skip", dict(select_kernel="block8eb")),
             ("skip", dict(select_kernel="block8b")), ("skip", dict(select_kernel="block16b")),
             ("skip", dict(select_kernel="block16eb")), ("skip", dict(select_kernel="block8bf")),
             ("skip", dict(select_kernel="pair8eb")), ("skip", dict(select_kernel="pair8bf")),
             ("skip", dict(select_kernel="pair8eb2")),
             ("skip", dict(select_kernel="pair8ebf2")), ("skip", dict(select_kernel="pair8bf2")),
             ("skip", dict(down_kernel="rows")), ("given", dict(down_kernel="rows")),
             ("given", dict(list_kernel="warp")), ("dense", dict(gemv_u=4)), ("skip", dict(gemv_u=4)),
             ("given", dict(gemv_u=4)), ("dense", dict(head_kernel="separate")),
             ("skip", dict(head_kernel="separate", gemv_u=4)), ("dense", dict(qkv_u=8)), ("skip", dict(qkv_u=None)),
             ("dense", dict(attn_kernel="split")), ("skip", dict(attn_kernel="split")),
             ("dense", dict(attn_kernel="split_pre")), ("skip", dict(attn_kernel="split_pre")),
             ("given", dict(attn_kernel="split_pre_cl8")), ("dense", dict(attn_kernel="split_pre_cl8w")),
             ("skip", dict(attn_kernel="split_pre_cl8w")), ("given", dict(attn_kernel="split_pre_cl8w"))]
    for mode, rung in rungs:
        dec = GraphDecoder(dmodel, mode=mode, weight_dtype=wdt, active=active if mode == "given" else None,
                           pdl=pdl, prefetch_bytes=prefetch, early_loads=early)
        assert dec.early_loads == (early and dec.pdl)
        assert (dec.select_kernel, dec.list_kernel) == (dc.SELECT_KERNEL, dc.LIST_KERNEL)
        for name, value in rung.items():
            setattr(dec, name, value)
        assert dec.pdl == (pdl and major >= 9)
        eager, lg_e = dec.generate(PROMPT, NEW, graph=False, return_logits=True)
        for _ in range(3):                              # capture once, replay: the same every time
            ids, lg = dec.generate(PROMPT, NEW, return_logits=True)
            assert ids == want_ids == eager, f"{mode} {rung} pdl={pdl} prefetch={prefetch}: {ids} != {want_ids}"
            if mode == "dense":                         # no atomics in the dense step: bit for bit
                np.testing.assert_array_equal(lg, lg_e)
            assert_logits_close(lg, want_logits, 1e-4, f"{mode} pdl={pdl} prefetch={prefetch} {wdt}")
        assert dec.pdl == (pdl and major >= 9)          # still on after the capture (the driver took it)
        assert int(dec.best.get()[0]) == 0 and int(dec.head_ticket.get()[0]) == 0   # head_argmax reset both


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["split", "split_pre", "split_pre_cl8", "split_pre_cl8w", "split_pre_clw", "block"])
def test_attention_kernels_over_many_chunks(cp, attn):
    """Each attention kernel gives the NumPy tokens past several 32-key chunks (the split
    kernels merge 3 chunks by then), from a prompt longer than one chunk, replayed twice."""
    cfg, ref, dev, _ = models(CONFIGS["d40-gqa5/1-drelu"], seed=11, max_seq_len=128)
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, cfg.vocab_size, 40)]
    want_ids, want_logits = reference(ref, prompt, 45)
    dec = GraphDecoder(to_device(cp, dev), weight_dtype="float32", attn_kernel=attn)
    for graph in (False, True, True):
        ids, lg = dec.generate(prompt, 45, graph=graph, return_logits=True)
        assert ids == want_ids, f"attn={attn} graph={graph}"
        assert_logits_close(lg, want_logits, 1e-4, f"attn={attn} graph={graph}")
    assert (dec.attn_ticket.get() == 0).all()            # every head's ticket reset for the next step


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [128, 256, 36])
def test_attention_preload_at_real_head_widths(cp, head_dim):
    """attn_kernel="split_pre" (each thread's first 4 key and value vectors of the earlier
    positions loaded before the programmatic wait) at head widths of real models: 128 (a
    thread's 4 vectors cover its share of a key), 256 (Gemma: 4 more after the wait), 36
    (9 vectors a key); prompt past one 32-key chunk, so the current key sits in a chunk with
    preloaded ones. NumPy tokens and logits, eager and graph replays (programmatic launch,
    early loads), and the same tokens as the plain split kernel."""
    cfg_kw = dict(dim=2 * head_dim, head_dim=head_dim, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=70,
                  vocab_size=97, activation="drelu", tie_embeddings=False)
    cfg, ref, dev, _ = models(cfg_kw, seed=13, max_seq_len=128)
    prompt = [int(t) for t in np.random.default_rng(1).integers(0, cfg.vocab_size, 37)]
    want_ids, want_logits = reference(ref, prompt, 40)
    dmodel = to_device(cp, dev)
    for attn in ("split_pre", "split_pre_cl8", "split_pre_cl8w", "split_pre_clw", "split"):
        dec = GraphDecoder(dmodel, weight_dtype="float32", attn_kernel=attn, pdl=True, early_loads=True)
        for graph in (False, True, True):
            ids, lg = dec.generate(prompt, 40, graph=graph, return_logits=True)
            assert ids == want_ids, f"attn={attn} head_dim={head_dim} graph={graph}"
            assert_logits_close(lg, want_logits, 1e-4, f"attn={attn} head_dim={head_dim} graph={graph}")


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["split_pre_cl8", "split_pre_cl8w", "split_pre_clw", "split_pre"])
def test_attention_over_several_clusters(cp, attn):
    """Past 8 chunks of 32 keys (a 270-token prompt, 30 new: up to 300 keys, 10 chunks) the
    clustered attention merges each cluster's chunks in distributed shared memory and the
    two clusters' partials through the ticket: NumPy tokens and logits, eager and graph."""
    cfg, ref, dev, _ = models(CONFIGS["d40-gqa5/1-drelu"], seed=17, max_seq_len=640)
    prompt = [int(t) for t in np.random.default_rng(2).integers(0, cfg.vocab_size, 270)]
    want_ids, want_logits = reference(ref, prompt, 30)
    dec = GraphDecoder(to_device(cp, dev), weight_dtype="float32", attn_kernel=attn, max_len=300)
    for graph in (False, True, True):
        ids, lg = dec.generate(prompt, 30, graph=graph, return_logits=True)
        assert ids == want_ids, f"attn={attn} graph={graph}"
        assert_logits_close(lg, want_logits, 1e-4, f"attn={attn} graph={graph}")
    assert (dec.attn_ticket.get() == 0).all()


@pytest.mark.gpu
def test_split_attention_has_no_max_len_limit(cp):
    cfg, ref, dev, _ = models(CONFIGS["d48-bias-relu"], seed=1)
    dmodel = to_device(cp, dev)
    with pytest.raises(ValueError, match="48 KB"):
        GraphDecoder(dmodel, weight_dtype="float32", max_len=20000, attn_kernel="block")
    dec = GraphDecoder(dmodel, weight_dtype="float32", max_len=20000)
    assert dec.generate(PROMPT, 3) == reference(ref, PROMPT, 3)[0]
    with pytest.raises(ValueError, match="attn_kernel"):
        GraphDecoder(dmodel, attn_kernel="flash")
    dec.select_kernel = "singel"                         # a typo is refused at the next step
    dec._graph = None
    with pytest.raises(ValueError, match="select_kernel"):
        dec.generate(PROMPT, 3)
    dec.select_kernel, dec.gemv_u = "split3", 6         # so is a load depth without a kernel
    with pytest.raises(ValueError, match="gemv_u"):
        dec.generate(PROMPT, 3)
    dec.gemv_u, dec.head_kernel = 8, "fast"             # and an unknown head rung
    with pytest.raises(ValueError, match="head_kernel"):
        dec.generate(PROMPT, 3)
    dec.head_kernel, dec.qkv_u = "fused", 2             # a q,k,v load depth without a kernel
    with pytest.raises(ValueError, match="qkv_u"):
        dec.generate(PROMPT, 3)
    dec.qkv_u, dec.down_kernel = None, "interleave"     # a down pass that does not exist
    with pytest.raises(ValueError, match="down_kernel"):
        dec.generate(PROMPT, 3)
    dec.down_kernel, dec.attn_kernel = "interleaved", "flash"   # and an attention rung that does not
    with pytest.raises(ValueError, match="attn_kernel"):
        dec.generate(PROMPT, 3)


@pytest.mark.gpu
@pytest.mark.parametrize("wdt", ["float32", "float16"])
def test_early_loads_on_rows_of_several_rounds(cp, wdt):
    """Rows long enough that the GEMVs' first round of loads really comes before the wait
    (dim 2304: float16 one round of 8 x 16 bytes per lane and a tail, float32 two rounds
    and a tail): with programmatic dependent launch and early loads, every mode gives the
    NumPy tokens and the logits of plain launches. (The small models above have rows
    shorter than one round: their early path is the plain one.)"""
    cfg_kw = dict(dim=2304, n_layers=3, n_heads=18, n_kv_heads=6, ffn_dim=1000, vocab_size=300,
                  activation="drelu", tie_embeddings=False)
    cfg, ref, dev, active = models(cfg_kw, seed=2, weights_f16=(wdt == "float16"), sparse=True)
    want_ids, want_logits = reference(ref, PROMPT, NEW)
    dmodel = to_device(cp, dev)
    for mode in ("dense", "skip", "given"):
        logits = {}
        for early in (False, True):
            dec = GraphDecoder(dmodel, mode=mode, weight_dtype=wdt, active=active if mode == "given" else None,
                               pdl=True if early else False, early_loads=early)
            for _ in range(3):
                ids, lg = dec.generate(PROMPT, NEW, return_logits=True)
                assert ids == want_ids, f"{mode} {wdt} early={early}: {ids} != NumPy {want_ids}"
                assert_logits_close(lg, want_logits, 1e-4, f"{mode} {wdt} early={early}")
            logits[early] = lg
        if mode == "dense":                             # the same sums in the same order: bit for bit
            np.testing.assert_array_equal(logits[True], logits[False])


@pytest.mark.gpu
@pytest.mark.parametrize("wdt", ["float32", "float16"])
@pytest.mark.parametrize("sparse", [True, False])
def test_sparse_rungs_on_long_rows_and_crowded_blocks(cp, wdt, sparse):
    """The skip pass's gate-block rungs (block8; block8e: gate loads before the wait;
    block8b: up to 4 kept up rows per round trip; block8eb: both; block16b/16eb: 16 loads
    in flight per lane; block8bf: fenced rounds; pair8*: two gate rows a warp, one or two
    pairs in turn, so blocks of 16 or 32 neurons and a partial last block at ffn 1000) and
    both down passes (rows;
    interleaved, at its own grid and on one block row, where a warp's slots run past its
    first 4 and the next ids load inside the loop) give the NumPy tokens, graph and eager,
    with programmatic launch and early loads. float32 at dim 2304 (576 vectors a row: two
    rounds of 8 loads and a tail, one of 16 and a tail), float16 at dim 4160 (520: two
    rounds of 8 and a tail, one of 16 and a tail; an eighth of a row is 65 vectors, so
    lane 0 of the up phase takes a second turn). ``sparse=False``:
    random drelu weights keep ~1/4 of the neurons, so blocks keep 5-8 of their 8 neurons
    and the up phase takes its second group of 4; given mode gets every neuron."""
    shape = dict(dim=2304, n_heads=18, n_kv_heads=6) if wdt == "float32" else dict(dim=4160, n_heads=26, n_kv_heads=13)
    cfg_kw = dict(n_layers=3, ffn_dim=1000, vocab_size=300, activation="drelu", tie_embeddings=False, **shape)
    cfg, ref, dev, active = models(cfg_kw, seed=4, weights_f16=(wdt == "float16"), sparse=sparse)
    if active is None:
        active = [np.arange(cfg.ffn_dim)] * cfg.n_layers
    want_ids, want_logits = reference(ref, PROMPT, NEW)
    dmodel = to_device(cp, dev)
    downs = [dict(down_kernel="rows"), dict(down_kernel="interleaved"),
             dict(down_kernel="interleaved", down_blocks_per_sm=1e-3)]
    firsts = [dict(select_kernel=sel) for sel in ("block8", "block8b", "block8e", "block8eb", "block16b", "block16eb",
                                                   "block8bf", "pair8bf", "pair8eb", "pair8bf2", "pair8eb2",
                                                   "pair8ebf2")]
    rungs = [("skip", {**a, **b}) for a in firsts for b in downs] + [("given", b) for b in downs]
    kept_max = 0
    for mode, rung in rungs:
        dec = GraphDecoder(dmodel, mode=mode, weight_dtype=wdt, active=active if mode == "given" else None,
                           pdl=True, early_loads=True, count_active=(mode == "skip"))
        for name, value in rung.items():
            setattr(dec, name, value)
        for graph in (False, True, True):
            ids, lg = dec.generate(PROMPT, NEW, graph=graph, return_logits=True)
            what = f"{mode} {rung} {wdt} graph={graph}"
            assert ids == want_ids, f"{what}: {ids} != NumPy {want_ids}"
            assert_logits_close(lg, want_logits, 1e-4, what)
        if dec.counts is not None:
            kept_max = max(kept_max, int(dec.counts.get().max()))
    if not sparse:              # > 20% kept: a block of 8 keeps >= 5 with p > 1%, ~60 times in this run
        assert kept_max > 0.2 * cfg.ffn_dim, kept_max
    # one block row of the interleaved down pass: 8 slots a round, so > 32 kept rows reload
    assert kept_max > 32


@pytest.mark.gpu
@pytest.mark.parametrize("early", [False, True])
def test_head_argmax_ties_zeros_and_nan_as_argmax_advance(cp, early):
    """The fused head + argmax kernel against the two-launch rung and np.argmax on logits
    built to be hard: a tie across blocks (the lowest id wins), -0 against +0 when every
    other logit is negative, NaN rows (passed over), every row NaN (id 0); 1003 rows: 126
    blocks, the last one partial. It leaves its key and ticket at 0 for the next step."""
    k = dc.kernels("float32", 0, early)
    N, D = 1003, 16
    rng = np.random.default_rng(0)
    x = cp.ones(D, dtype=cp.float32)                 # rstd(x) = 1/sqrt(1 + eps): one common factor

    def run(vals, kernel):
        w = np.zeros((N, D), dtype=np.float32)
        w[:, 0] = vals                                   # w . x = vals (exact: the other columns are 0)
        logits = cp.zeros(N, dtype=cp.float32)
        tokens, pos, n_prompt = cp.zeros(8, cp.int32), cp.array([2], cp.int32), cp.array([1], cp.int32)
        best, ticket = cp.zeros(1, cp.uint64), cp.zeros(1, cp.uint32)
        i32, f32 = np.int32, np.float32
        wg = cp.asarray(w)
        if kernel == "fused":
            k["head_argmax"](((N + 7) // 8,), (256,), (wg, x, logits, i32(N), i32(D), i32(D), f32(1e-5), best, ticket,
                                                       tokens, pos, n_prompt, i32(8), np.uint64(0), i32(0), np.uint64(0)))
        else:
            k["gemv_vec16_norm"](((N + 7) // 8,), (256,), (wg, x, logits, i32(N), i32(D), i32(D), f32(1e-5)))
            k["argmax"]((1,), (1024,), (logits, i32(N), tokens, pos, n_prompt, i32(8), np.uint64(0), i32(0),
                                        np.uint64(0)))
        assert int(pos.get()[0]) == 3 and int(best.get()[0]) == 0 and int(ticket.get()[0]) == 0
        return int(tokens.get()[3])

    cases = []
    v = rng.normal(size=N).astype(np.float32)
    v[[37, 900]] = v.max() + 1.0                     # a tie in two blocks: 37
    cases.append((v, 37))
    v = -np.abs(rng.normal(size=N)).astype(np.float32) - 1.0
    v[700], v[500] = 0.0, -0.0                       # -0 == +0: the lower id, 500
    cases.append((v, 500))
    v = rng.normal(size=N).astype(np.float32)
    v[[3, 400]] = np.nan
    cases.append((v, int(np.nanargmax(v))))
    cases.append((np.full(N, np.nan, np.float32), 0))
    v = rng.normal(size=N).astype(np.float32)
    v[N - 1] = 9.0                                   # the winner in the last, partial block
    cases.append((v, N - 1))
    for vals, want in cases:
        assert run(vals, "fused") == want == run(vals, "separate")


def test_blocks_per_sm_from_registers():
    """What fits a multiprocessor by registers (64K, per warp in units of 256; 8-warp
    blocks; at most 64 warps), as ptxas reported this round's kernels; the fallback where a
    kernel object does not say."""
    class Fn:
        def __init__(self, regs):
            self.num_regs = regs
    want = {80: 3, 70: 3, 64: 4, 60: 4, 56: 4, 50: 4, 48: 5, 40: 6, 32: 8, 24: 8, 96: 2, 128: 2, 255: 1}
    assert {r: dc.blocks_per_sm(Fn(r), 99) for r in want} == want
    assert dc.blocks_per_sm(object(), 3) == 3
    assert dc.blocks_per_sm(Fn("n/a"), 4) == 4


def test_prefetch_bytes_are_checked():
    from minisparse.kernels import decode_cuda as dc
    from minisparse.kernels.decode_cuda import Launcher, kernels
    for bad in (-128, 100, 8192):
        with pytest.raises(ValueError, match="prefetch_bytes"):
            kernels("float16", bad)
    with pytest.raises(TypeError, match="kernel argument"):
        Launcher._c_value("x")
    assert GraphDecoder._pdl_sites("auto", "dense") == frozenset(dc.PDL_SITES)
    assert GraphDecoder._pdl_sites("auto", "skip") == frozenset(dc.PDL_SITES)
    assert GraphDecoder._pdl_sites(False, "skip") == frozenset()
    assert GraphDecoder._pdl_sites(True, "dense") == frozenset(dc.PDL_SITES)
    assert GraphDecoder._pdl_sites(["attn", "oproj"], "skip") == {"attn", "oproj"}
    with pytest.raises(ValueError, match="launch sites"):
        GraphDecoder._pdl_sites(["attention"], "skip")
    with pytest.raises(ValueError, match="pdl must be"):
        GraphDecoder._pdl_sites("yes", "skip")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["decode", "fused", "split"])
def test_given_mode_really_skips(cp, kernel):
    """A wrong active set changes the result: the given mode reads only what it is given."""
    cfg, ref, dev, active = models(CONFIGS["d40-gqa5/1-drelu"], seed=3, sparse=True)
    dmodel = to_device(cp, dev)
    good = GraphDecoder(dmodel, mode="given", weight_dtype="float32", active=active, sparse_kernel=kernel)
    bad = GraphDecoder(dmodel, mode="given", weight_dtype="float32", active=[a[:1] for a in active],
                       sparse_kernel=kernel)
    _, lg = good.generate(PROMPT, 3, return_logits=True)
    _, lb = bad.generate(PROMPT, 3, return_logits=True)
    assert np.abs(lg - lb).max() > 1e-6


@pytest.mark.gpu
def test_device_errors(cp):
    cfg, ref, dev, _ = models(CONFIGS["d48-bias-relu"], seed=1)
    dec = GraphDecoder(to_device(cp, dev), mode="dense", weight_dtype="float32", max_len=12)
    with pytest.raises(ValueError, match="max_len"):
        dec.generate(PROMPT, 7)                     # 7 + 7 - 1 = 13 > 12
    assert len(dec.generate(PROMPT, 6)) == 6        # 12 positions: fits exactly
    assert dec.generate(PROMPT, 0) == []
    with pytest.raises(ValueError, match="vocab_size"):
        dec.generate([1, 999], 2)
    with pytest.raises(ValueError, match="given"):
        GraphDecoder(to_device(cp, dev), mode="given")
    with pytest.raises(ValueError, match="one entry per layer"):
        GraphDecoder(to_device(cp, dev), mode="given", active=[np.arange(3)])


# --------------------------------------------------------------------------------------
# input checks that need no GPU
# --------------------------------------------------------------------------------------
def test_numpy_params_are_refused_with_the_fix():
    model = ms.Transformer(ms.preset("nano", activation="drelu"), seed=0)
    with pytest.raises(TypeError, match=r"model.to\('cupy'\)"):
        GraphDecoder(model)


def test_moe_is_refused_with_the_eager_path_named():
    model = ms.Transformer(ms.preset("tiny-moe", n_layers=1), seed=0)
    with pytest.raises(NotImplementedError, match="eager device path"):
        GraphDecoder(model)


def test_relu_after_the_norms_is_refused_with_the_eager_path_named():
    model = ms.Transformer(ms.preset("nano", activation="drelu", norm_relu=True), seed=0)
    with pytest.raises(NotImplementedError, match="norm_relu"):
        GraphDecoder(model)


def test_bad_mode_and_dtype():
    model = ms.Transformer(ms.preset("nano"), seed=0)
    with pytest.raises(ValueError, match="mode"):
        GraphDecoder(model, mode="fast")
    with pytest.raises(ValueError, match="weight_dtype"):
        GraphDecoder(model, weight_dtype="bfloat16")
    with pytest.raises(ValueError, match="sparse_kernel"):
        GraphDecoder(model, sparse_kernel="magic")


@pytest.mark.parametrize("act", ["drelu", "relu", "reglu", "relu2glu"])
def test_exactly_sparse_params_are_exact(act):
    cfg = ms.ModelConfig(dim=40, n_layers=3, n_heads=5, n_kv_heads=1, ffn_dim=70, vocab_size=97,
                         activation=act, tie_embeddings=False, max_seq_len=64)
    p, active = exactly_sparse_params(cfg, sparsity=0.9, seed=2)
    model = ms.Transformer(cfg, params=p)
    seen = []
    model(np.random.default_rng(0).integers(0, 97, size=(2, 50)),
          ffn_hook=lambda layer, expert, h: seen.append((layer, h != 0)))
    for layer, nz in seen:
        want = np.zeros(cfg.ffn_dim, dtype=bool)
        want[active[layer]] = True
        assert (nz == want[None, :]).all(), f"layer {layer}: the nonzero neurons are not the constructed set"


def test_exactly_sparse_params_refuses_non_relu():
    cfg = ms.preset("nano", activation="swiglu")
    with pytest.raises(ValueError, match="ReLU"):
        exactly_sparse_params(cfg)


@pytest.mark.parametrize("W", ["float", "unsigned short"])
def test_every_attention_rung_names_a_compiled_kernel_and_whole_clusters(W):
    """Without a GPU: each split attention rung, at 1 to 40 chunks of keys, maps to a kernel
    the module compiles at sm_90, with a grid of whole clusters (the template's CL) that
    covers every chunk; "split_pre_clw" puts a head's chunks in one cluster up to 8."""
    template_args = load_bench("decode_sass").template_args
    names = dc.kernel_names(W, 90)
    for attn in dc.ATTN_KERNELS:
        if not attn.startswith("split"):
            continue
        for chunks in range(1, 41):
            max_len = dc.ATTN_CHUNK * chunks - (chunks % 3)          # not always a whole chunk
            key, ny = dc.attn_launch(attn, max_len)
            assert key in names, (attn, chunks, key)
            assert ny >= dc.attn_splits(max_len) == chunks, (attn, chunks, ny)
            name, args = template_args(names[key])
            if name == "attn_decode_split_cl":
                cl = int(args[1])
                assert ny % cl == 0 and ny - chunks < cl, (attn, chunks, ny, cl)
                if attn == "split_pre_clw":
                    assert cl == min(8, max(2, chunks)), (chunks, cl)
            else:
                assert ny == chunks, (attn, chunks, ny)
    assert not any("_cl" in k for k in dc.kernel_names(W, 80) if k.startswith("attn"))   # clusters: sm_90
    for bad in ("flash", "block", "split_pre_cl4"):                # not a split rung: one clear error
        with pytest.raises(ValueError, match="attn_kernel must be one of"):
            dc.attn_launch(bad, 144)


@pytest.mark.parametrize("W", ["unsigned short", "float"])
def test_every_select_rung_names_a_compiled_kernel_and_its_grid(W):
    """Without a GPU: each skip-mode first-half rung maps to a kernel the module compiles
    (a typo would only fail on the device, at the first step), and the first launch's grid
    (GATE_ROWS_PER_WARP) matches the kernel's rows per warp: ffn_gate_block2<W, U, FN, EL,
    P> takes 2 P gate rows a warp, ffn_gate_block one; a grid too small for the kernel
    would leave neurons out without an error."""
    template_args = load_bench("decode_sass").template_args        # ('name', (args...)), tested there
    names = dc.kernel_names(W, 90)
    assert dc.SELECT_KERNEL in dc.SELECT_KERNELS
    fallback = {"split3", "split3pair", "pair", "single"}      # ffn_gate_select(_u8) / ffn_gate_select2
    assert set(dc.SELECT_FIRST) == set(dc.SELECT_KERNELS) - fallback
    assert {"ffn_gate_select", "ffn_gate_select_u8", "ffn_gate_select2"} <= set(names)
    for sel, key in dc.SELECT_FIRST.items():
        assert key in names, f"{sel}: no kernel {key!r}"
        expr = names[key]
        args = template_args(expr)[1]
        assert args[0] == W, expr
        if expr.startswith("ffn_gate_block2<"):
            P = int(args[4]) if len(args) > 4 else 1
            assert dc.GATE_ROWS_PER_WARP[sel] == 2 * P, (sel, expr)
        else:
            assert expr.startswith("ffn_gate_block<") and dc.GATE_ROWS_PER_WARP.get(sel, 1) == 1, (sel, expr)
    assert dc.GATE_ROWS_PER_WARP["pair"] == dc.GATE_ROWS_PER_WARP["split3pair"] == 2   # ffn_gate_select2
    assert set(dc.GATE_ROWS_PER_WARP) <= set(dc.SELECT_KERNELS)
    assert len(set(names.values())) == len(names), "one kernel compiled under two keys"
    assert not any(k.startswith("ffn_given1_c") for k in dc.kernel_names(W, 80))   # clusters need sm_90


@pytest.mark.parametrize("W", ["float", "unsigned short"])
def test_every_kernel_the_decoder_launches_is_compiled(W):
    """Without a GPU: every kernel key the decoder and the CuPy backend's one-token path
    look up (``k["name"]``, ``k["name" + u8]``, ``k["name" + xs]`` in the source) is one the
    module compiles, with each suffix it can take; a misspelt key would only fail on the
    device, at the first step of the rung that uses it."""
    import pathlib
    import re
    names = dc.kernel_names(W, 90)
    pkg = pathlib.Path(dc.__file__).parent
    suffixes = {"u8": ("", "_u8"), "qkv_u8": ("", "_u8"), "xs": ("_xf32", "_xf16")}
    looked_up = 0
    for path in (pkg / "decode_cuda.py", pkg / "cupy_.py"):
        for expr in re.findall(r'\bk\[([^\]]+)\]', path.read_text()):
            if '"' not in expr:                                 # k[first], k[("gate", tt)]...: not literal keys
                continue
            if path.name == "cupy_.py" and "(" in expr:        # cupy_'s own kernel table
                continue
            m = re.search(r'\+\s*(\w+)\s*$', expr)
            ends = suffixes[m.group(1)] if m else ("",)
            for lit in re.findall(r'"([a-z0-9_]+)"', expr):
                for end in ends:
                    assert lit + end in names, f"{path.name}: k[{expr}] looks up {lit + end!r}, not compiled"
                    looked_up += 1
    assert looked_up >= 20, looked_up                           # the scan found the decoder's lookups
