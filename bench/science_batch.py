"""Run a named batch of TurboSparse-reproduction jobs in parallel, inside a hard deadline.

One *job* is one run of ``bench/reproduce_turbosparse.py``: ``train`` (one activation,
seed, step count, learning rate and depth; or one ReLUfication of a seed's swiglu) then
``analyse``, each a fresh Python process with a fixed number of BLAS threads
(``OPENBLAS_NUM_THREADS`` = ``OMP_NUM_THREADS`` = ... = the job's ``threads``, 1 by default).
Jobs run in a pool of ``--workers`` cores, the longest (estimated) first; a job that needs
2 threads takes 2 cores. A job is started only when its estimated wall time fits before the
deadline; at the deadline every job still running is killed (its whole process group) and
recorded as unfinished, and the driver exits.

Results go to ``--out DIR`` as they finish, in few files (a device machine returns at most
8 files from its output folder):

* ``DIR/runs.tar.gz``: every analysed run's JSON (``turbosparse/<key>.json``, the same files
  ``analyse`` writes to ``bench/results/turbosparse/``) and every job's log
  (``logs/<job>.log``, killed jobs' logs too: they show how far training got); rewritten
  after each finished job, so a killed driver still leaves what was done;
* ``DIR/batch_log.json``: the CPU (``lscpu`` model name, CPUs, threads per core), the git
  commit, and per job its command lines, estimated and measured wall time, status
  (``done`` / ``failed`` / ``killed at deadline`` / ``not started``).

Checkpoints stay in a temporary folder and are deleted.

    python bench/science_batch.py --plan A --dry-run            # the jobs, core-minutes, a schedule
    PYTHONPATH=. python bench/science_batch.py --plan A --workers 13 --deadline-s 520 --out $OUT/science
    python bench/science_batch.py --plan quick --workers 2 --deadline-s 120 --out /tmp/sb   # smoke test
    python bench/science_batch.py --plan C --only 'tiny_L8_*_seed[12],*_lr0.01_seed1' --dry-run   # chosen jobs, in this order

Merging back: ``python bench/science_batch.py --merge DIR`` unpacks ``DIR/runs.tar.gz``'s
run JSONs into ``bench/results/turbosparse/`` (existing files are kept unless ``--force``).

The time estimates (``COST``) are single-thread seconds measured on one quiet core of a
2-core Intel Xeon (the project's development VM); ``--est-scale`` multiplies them (set it
from the measured/estimated ratio in a previous batch_log.json).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCRIPT = HERE / "reproduce_turbosparse.py"
RUNS_JSON = HERE / "results" / "turbosparse"

# --------------------------------------------------------------------------------------
# cost model: single-thread wall seconds on a quiet core (see the module docstring)
# --------------------------------------------------------------------------------------
COST = {
    # training seconds per 100 steps of the tiny preset at 4 layers, batch 16 x 128
    # (measured 100 steps, one thread: swiglu 23.1, drelu 19.2, reglu 16.1, relu 14.3, geglu 51)
    "train_per_100": {"swiglu": 23.0, "drelu": 19.5, "reglu": 16.5, "relu": 14.5, "geglu": 51.0},
    # analysis (whole validation split, top-k, CETT, predictors for sparse models) at 4 layers
    # (measured: swiglu 40, drelu 56; the others scaled from earlier runs)
    "analyse": {"swiglu": 40.0, "drelu": 56.0, "reglu": 55.0, "relu": 50.0, "geglu": 110.0},
    "startup": 6.0,          # per process: imports, corpus
    "nano_factor": 0.08,     # --quick (nano preset) relative to tiny
    # share of a step's single-thread time in BLAS matmuls (the rest is element-wise NumPy,
    # one thread whatever the setting); geglu's exact-erf GELU makes its share smaller
    "blas_share": {"swiglu": 0.55, "drelu": 0.55, "reglu": 0.55, "relu": 0.55, "geglu": 0.3},
    "thread_efficiency": 0.75,
    # GPU training of the tiny model (not measured yet: a guess, launch-bound eager CuPy)
    "gpu_step_s": 0.04, "gpu_startup": 15.0,
}
EST_SCALE = 1.15  # measured / estimated wall on the machine the plans run on (updated from batch_log.json;
#                   1.15 before the first call: that host's 1-thread float32 matmul ran at 70 GFLOP/s, this
#                   machine's at 85, bench/results/train_throughput_xeon_1thread.json)
MIN_PARALLEL_EFFICIENCY = 0.75   # give a job t > 1 threads only if speed-up / t >= this
SAFETY = 0.9      # a job is planned with the fewest threads whose estimate is <= SAFETY x the time left


REF_S_PER_STEP = 0.217   # --probe on this VM, one thread: 0.18-0.23 s per tiny swiglu step (the other core busy or not);
#                          0.217 = 0.20 / 0.92: the first H200-host batch ran its CPU jobs in 0.85-0.93 x the estimate


def probe(steps: int = 25) -> dict:
    """Seconds per training step of the tiny swiglu model in this process (after 5 warm-up
    steps): what --calibrate measures on every core at once."""
    import minisparse as ms
    from minisparse.data import load_corpus
    from minisparse.train import TrainConfig, train
    corpus = load_corpus(max_bytes=2_000_000)
    model = ms.Transformer(ms.preset("tiny", activation="swiglu"), seed=0)
    kw = dict(batch_size=16, seq_len=128, lr=3e-3, warmup=2, eval_every=10 ** 9, eval_batches=1, progress=False,
              log_every=10 ** 9)
    train(model, corpus, TrainConfig(steps=5, **kw))
    t0 = time.perf_counter()
    train(model, corpus, TrainConfig(steps=steps, **kw))
    return {"s_per_step": (time.perf_counter() - t0) / steps, "threads": os.environ.get("OPENBLAS_NUM_THREADS")}


def depth_factor(layers: int) -> float:
    """Cost of ``layers`` blocks relative to 4 (embedding and head are fixed): swiglu 100 steps
    took 23.1 s at 4 layers and 39.5 s at 8 on one thread, so 0.28 + 0.18 x layers."""
    return 0.28 + 0.18 * layers


def speedup(act: str, threads: int) -> float:
    f = COST["blas_share"][act]
    return 1.0 / ((1 - f) + f / (1 + (threads - 1) * COST["thread_efficiency"]))


@dataclass
class Job:
    act: str                      # activation (base run) or the ReLUfication target
    seed: int
    steps: int = 800
    lr: float = 3e-3
    layers: int = 4
    relufy: bool = False          # ReLUfy seed's swiglu (steps) to `act` for steps // 2
    threads: int = 1              # the fewest BLAS threads (the driver may give more, see `fit`)
    quick: bool = False
    gpu: bool = False             # train on the GPU (reproduce_turbosparse --device cupy); analyse on the CPU
    prio: float = 9               # lower runs first (the priority order)
    name: str = ""
    est_s: float = 0.0            # estimated wall at `threads` threads, EST_SCALE included

    def __post_init__(self):
        if not self.name:
            self.name = self.key()
        self.est_s = self.estimate(self.threads)

    def key(self) -> str:
        pre = "nano" if self.quick else "tiny"
        if self.relufy:
            return f"{pre}_L{self.layers}_swiglu-to-{self.act}_st{self.steps}+{self.steps // 2}_lr{self.lr:g}_seed{self.seed}"
        return f"{pre}_L{self.layers}_{self.act}_st{self.steps}_lr{self.lr:g}_seed{self.seed}" + ("_gpu" if self.gpu else "")

    def estimate(self, threads: int = 1) -> float:
        c, depth = COST, depth_factor(self.layers)
        per = c["train_per_100"]
        if self.gpu:           # GPU training: launch-bound, so per step whatever the threads
            return (c["gpu_step_s"] * self.steps * depth + c["analyse"][self.act] * depth / speedup(self.act, threads)
                    + 2 * c["startup"] + c["gpu_startup"]) * EST_SCALE
        if self.relufy:
            t = (per["swiglu"] * self.steps + per[self.act] * (self.steps // 2)) / 100
        else:
            t = per[self.act] * self.steps / 100
        t = t * depth + c["analyse"][self.act] * depth
        if self.quick:
            t *= c["nano_factor"]
        t = t / speedup(self.act, threads) + 2 * c["startup"]
        return t * EST_SCALE

    def fit(self, cores_free: int, time_left: float, est_scale: float = 1.0) -> int:
        """The threads to start this job with now: the fewest (>= self.threads, <= 4,
        <= cores_free) whose estimate is at most SAFETY x ``time_left``; 0 if none."""
        for t in range(self.threads, min(4, cores_free) + 1):
            if t > self.threads and speedup(self.act, t) / t < MIN_PARALLEL_EFFICIENCY:
                break          # extra cores would mostly idle: leave them to other jobs
            if self.estimate(t) * est_scale <= SAFETY * time_left:
                return t
        return 0

    def commands(self, ckpt: Path, out_json: Path) -> List[List[str]]:
        py = [sys.executable, str(SCRIPT)]
        common = (["--quick"] if self.quick else []) + ["--seeds", str(self.seed), "--lr", f"{self.lr:g}",
                                                       "--layers", str(self.layers), "--ckpt-root", str(ckpt)]
        if self.relufy:
            train = py + ["train", "--models", "", "--steps", str(self.steps), "--relufy", "--relufy-to", self.act,
                          "--no-equal-budget"] + common
            runs = f"*swiglu-to-{self.act}_*"
        else:
            train = py + ["train", "--models", self.act, "--steps", str(self.steps)] + common
            if self.gpu:
                train += ["--device", "cupy"]
            runs = self.key()
        analyse = py + ["analyse", "--runs", runs, "--out-json", str(out_json)] + common
        return [train, analyse]


# --------------------------------------------------------------------------------------
# plans
# --------------------------------------------------------------------------------------
def _base(acts, seeds, **kw):
    return [Job(a, s, **kw) for s in seeds for a in acts]


def master_jobs() -> List[Job]:
    """Every job issue #15 asks for at the tiny scale, with its priority (lower runs first).

    (a) swiglu/drelu at 1600 steps (2x: 3200 steps of swiglu need ~740 s of training on one
    core, more than one call) > (b) reglu, relu to 5 seeds, geglu to 3 > (c) learning rate
    1e-3 / 1e-2 beside 3e-3, seed 0 then seed 1 > (d) depth 8 to 3 seeds, depth 12 to 2 >
    (e) equal-budget ReLUfication seed 2 > depth 12 seed 2 > geglu seeds 3-4 and its lr
    sweep > ReLUfication seeds 3-4. geglu is last among (b) because one geglu run costs ~3
    swiglu runs (its exact-erf GELU is element-wise NumPy, which extra threads do not speed up).
    """
    jobs = []
    jobs += _base(["reglu", "relu"], [0, 1, 2, 3, 4], prio=2)                                  # (b)
    jobs += _base(["geglu"], [0, 1, 2], prio=2.5)
    # (c) swiglu/drelu seed 0 start before (b) within a call: the short relu/reglu jobs then
    #     pack into the slots they free, so (b) and this part of (c) both finish in one call
    jobs += _base(["swiglu", "drelu"], [0], lr=1e-3, prio=1.9) + _base(["swiglu", "drelu"], [0], lr=1e-2, prio=1.9)
    jobs += _base(["reglu", "relu"], [0], lr=1e-3, prio=3.2) + _base(["reglu", "relu"], [0], lr=1e-2, prio=3.2)
    jobs += _base(["swiglu", "drelu"], [1], lr=1e-3, prio=3.5) + _base(["swiglu", "drelu"], [1], lr=1e-2, prio=3.5)
    jobs += _base(["reglu", "relu"], [1], lr=1e-3, prio=3.7) + _base(["reglu", "relu"], [1], lr=1e-2, prio=3.7)
    jobs += _base(["swiglu", "drelu"], [0, 1, 2], layers=8, prio=4)                            # (d)
    # (a) on the CPU at 2x: the 4x runs are the GPU jobs (gpu_jobs); these give a middle length
    jobs += _base(["swiglu", "drelu"], [0, 1, 2, 3, 4], steps=1600, prio=4.2)
    jobs += _base(["swiglu", "drelu"], [0, 1], layers=12, prio=4.5)
    jobs += [Job(t, 2, relufy=True, prio=5) for t in ("reglu", "drelu")] + \
        _base(["swiglu"], [2], steps=1200, prio=5)                                             # (e)
    jobs += _base(["swiglu", "drelu"], [2], layers=12, prio=5.5)
    jobs += _base(["geglu"], [3, 4], prio=6) + _base(["geglu"], [0], lr=1e-3, prio=6.2) + \
        _base(["geglu"], [0], lr=1e-2, prio=6.2)
    jobs += [Job(t, s, relufy=True, prio=6.5) for s in (0, 1, 3, 4) for t in ("reglu", "drelu")] + \
        _base(["swiglu"], [0, 1, 3, 4], steps=1200, prio=6.5)
    return jobs


def gpu_jobs() -> List[Job]:
    """(a) at 4x the steps, trained on the GPU (opt-in with --gpu): swiglu and drelu, 3200
    steps, paired seeds 0-4. The tiny model's GPU step is launch-bound (one core drives it)."""
    return _base(["swiglu", "drelu"], [0, 1, 2, 3, 4], steps=3200, gpu=True, prio=0.5)


def plan_jobs(name: str, skip_existing: bool = True, gpu: bool = False) -> List[Job]:
    """The named plan's jobs. A, B and C are the same queue (`master_jobs`) minus the runs
    whose result JSON is already in bench/results/turbosparse/ (merge each call's results
    before the next call): each call takes the next jobs in priority order that fit."""
    n = name.upper()
    if n == "QUICK":        # the smoke test: nano models, 40 steps
        return _base(["drelu", "relu"], [0], quick=True, layers=2, steps=40) + \
            [Job("reglu", 0, quick=True, layers=2, steps=40, relufy=True)]
    if n not in ("A", "B", "C", "ALL"):
        raise SystemExit(f"error: unknown plan {name!r}; choose one of quick, A, B, C")
    jobs = (gpu_jobs() if gpu else []) + master_jobs()
    if skip_existing:
        jobs = [j for j in jobs if not (RUNS_JSON / f"{j.key()}.json").exists()]
    return jobs


def select(jobs: List[Job], only: str) -> List[Job]:
    """The jobs whose key matches one of ``only``'s comma-separated shell globs
    (``fnmatch``, e.g. ``"tiny_L8_*_seed[12],*_lr0.01_seed1"``), in the order of the globs: a
    job's priority becomes the index of the first glob it matches (plus its own priority / 100,
    so the issue's order still holds inside one glob). An empty selection is an error."""
    import fnmatch
    pats = [p.strip() for p in only.split(",") if p.strip()]
    if not pats:
        raise SystemExit("error: --only got no pattern; pass comma-separated globs of job keys, e.g. 'tiny_L8_*'")
    out = []
    for j in jobs:
        hit = next((i for i, p in enumerate(pats) if fnmatch.fnmatchcase(j.key(), p)), None)
        if hit is not None:
            j.prio = hit + j.prio / 100
            out.append(j)
    if not out:
        raise SystemExit(f"error: --only {only!r} matches none of the plan's jobs still to run; "
                         "see them with --dry-run (without --only), or add --all")
    return out


def order(jobs: List[Job]) -> List[Job]:
    # GPU jobs by seed, so that a seed's swiglu and drelu run in the same wave (paired)
    return sorted(jobs, key=lambda j: (j.prio, j.seed if j.gpu else 0, -j.est_s))


def simulate(jobs: List[Job], workers: int, deadline_s: float, est_scale: float = 1.0, gpu_slots: int = 5):
    """Schedule the jobs as the driver does (priority order, then longest first; a job starts
    with the fewest threads whose estimate fits before the deadline) on ``workers`` cores;
    {name: (start, end, threads)} for the jobs started."""
    now, cores_free, running, out = 0.0, workers, [], {}
    pending = order(jobs)
    while True:
        for j in list(pending):
            if j.gpu and sum(r[1].gpu for r in running) >= gpu_slots:
                continue
            t = j.fit(cores_free, deadline_s - now, est_scale)
            if t:
                end = now + j.estimate(t) * est_scale
                running.append((end, j, t))
                cores_free -= t
                out[j.name] = (now, end, t)
                pending.remove(j)
        if not running:
            break
        running.sort(key=lambda x: x[0])
        now, j, t = running.pop(0)
        cores_free += t
    return out


# --------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------
def cpu_info() -> dict:
    info = {"os_cpu_count": os.cpu_count()}
    try:
        txt = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in txt.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "Socket(s)",
                             "L3 cache", "CPU max MHz"):
                info[k.strip()] = v.strip()
    except (OSError, subprocess.SubprocessError) as e:
        info["lscpu_error"] = str(e)
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def git_info() -> dict:
    def g(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    dirty = g("status", "--porcelain", "--untracked-files=no")
    return {"commit": g("rev-parse", "HEAD"), "dirty_files": dirty.splitlines()[:50]}


def _env(threads: int) -> dict:
    env = dict(os.environ)
    for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[k] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    env["MPLBACKEND"] = "Agg"
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class Batch:
    def __init__(self, jobs: List[Job], workers: int, deadline_s: float, out: Path, est_scale: float, plan: str,
                 gpu_slots: int = 5):
        self.jobs, self.workers, self.out, self.est_scale = jobs, workers, out, est_scale
        self.gpu_slots = gpu_slots
        self.do_calibrate = True
        self.t0 = time.monotonic()
        self.kill_at = self.t0 + deadline_s - 8.0          # leave time to kill, pack and exit
        self.deadline_s = deadline_s
        self.tmp = Path(tempfile.mkdtemp(prefix="science_batch_"))
        self.json_dir = self.tmp / "json"
        self.log_dir = self.tmp / "logs"
        self.json_dir.mkdir()
        self.log_dir.mkdir()
        self.records = {j.name: {"job": asdict(j), "status": "pending", "est_s": round(j.est_s * est_scale, 1)}
                        for j in jobs}
        self.log = {"plan": plan, "workers": workers, "gpu_slots": gpu_slots, "deadline_s": deadline_s, "est_scale": est_scale,
                    "cpu": cpu_info(), "git": git_info(), "python": sys.version.split()[0],
                    "started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()) + " UTC", "jobs": self.records}

    # -- bookkeeping -------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def write(self, final: bool = False) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.log["elapsed_s"] = round(self.elapsed(), 1)
        if final:
            try:
                self.log["cpu"]["loadavg_end"] = os.getloadavg()
            except OSError:
                pass
            self.log["finished"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()) + " UTC"
            done = [r for r in self.records.values() if r["status"] == "done"]
            self.log["summary"] = {
                "done": len(done), "jobs": len(self.records),
                "measured_over_estimated": (round(sum(r["wall_s"] for r in done) /
                                                  sum(r["est_s"] for r in done), 3) if done else None)}
        tmp = self.out / "batch_log.json.part"
        tmp.write_text(json.dumps(self.log, indent=1, default=str))
        tmp.replace(self.out / "batch_log.json")

    def pack(self) -> None:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for f in sorted(self.json_dir.glob("*.json")):
                tar.add(f, arcname=f"turbosparse/{f.name}")
            for f in sorted(self.log_dir.glob("*.log")):
                tar.add(f, arcname=f"logs/{f.name}")
        tmp = self.out / "runs.tar.gz.part"
        tmp.write_bytes(buf.getvalue())
        tmp.replace(self.out / "runs.tar.gz")

    # -- processes ---------------------------------------------------------------------
    def start_stage(self, st: dict) -> None:
        j, cmds = st["job"], st["cmds"]
        st["fh"].write(f"\n$ {' '.join(cmds[st['stage']])}\n")
        st["fh"].flush()
        st["proc"] = subprocess.Popen(cmds[st["stage"]], cwd=ROOT, env=_env(st["threads"]), stdout=st["fh"],
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      preexec_fn=os.setpgrp)     # own process group, same session

    def kill_all(self, sts: List[dict]) -> None:
        """SIGTERM every job's process group at once, then SIGKILL what is left after 3 s."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for st in sts:
                if st["proc"].poll() is None:
                    try:
                        os.killpg(st["proc"].pid, sig)
                    except (ProcessLookupError, PermissionError):
                        pass
            t_end = time.monotonic() + 3.0
            while time.monotonic() < t_end and any(st["proc"].poll() is None for st in sts):
                time.sleep(0.1)

    def finish(self, st: dict, status: str) -> None:
        j, rec = st["job"], self.records[st["job"].name]
        rec["status"] = status
        rec["wall_s"] = round(time.monotonic() - st["t_start"], 1)
        rec["stage_wall_s"] = st["stage_walls"]
        rec["started_at_s"] = round(st["t_start"] - self.t0, 1)
        st["fh"].close()
        produced = sorted(p.name for p in st["json"].glob("*.json"))
        rec["results"] = produced
        for f in st["json"].glob("*.json"):
            shutil.copy2(f, self.json_dir / f.name)
        shutil.rmtree(st["ckpt"], ignore_errors=True)
        self.pack()
        self.write()
        print(f"[{self.elapsed():6.0f} s] {j.name}: {status} in {rec['wall_s']:.0f} s "
              f"(estimated {rec['est_s']:.0f} s)", flush=True)

    def calibrate(self, timeout: float = 90.0) -> None:
        """Time a few training steps on every core at once (one third of the cores at 1 BLAS
        thread, the rest in pairs at 2) and set the estimates from it: EST_SCALE = measured
        seconds per 1-thread step / REF_S_PER_STEP, and the 2-thread efficiency."""
        global EST_SCALE
        n1 = max(1, self.workers // 3)
        n2 = (self.workers - n1) // 2
        procs = []
        for i in range(n1 + n2):
            t = 1 if i < n1 else 2
            procs.append((t, subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--probe"], cwd=ROOT,
                                              env=_env(t), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                              text=True, preexec_fn=os.setpgrp)))
        res = {1: [], 2: []}
        t_end = time.monotonic() + timeout
        for t, p in procs:
            try:
                out, _ = p.communicate(timeout=max(1.0, t_end - time.monotonic()))
                res[t].append(json.loads(out.strip().splitlines()[-1])["s_per_step"])
            except Exception as e:           # a probe that fails or hangs: keep the defaults
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                self.log.setdefault("calibration_errors", []).append(f"{type(e).__name__}: {e}"[:300])
        cal = {"s_per_step_1thread": res[1], "s_per_step_2threads": res[2], "ref_s_per_step": REF_S_PER_STEP,
               "prior_est_scale": EST_SCALE, "prior_thread_efficiency": COST["thread_efficiency"],
               "wall_s": round(time.monotonic() - self.t0, 1)}
        if res[1]:
            s1 = float(np.median(res[1]))
            EST_SCALE = min(1.6, max(0.6, s1 / REF_S_PER_STEP))     # clamped: a disturbed probe must not stop all
            if res[2]:
                r = s1 / float(np.median(res[2]))                    # measured 2-thread speed-up
                f = COST["blas_share"]["swiglu"]
                denom = 1 / r - (1 - f)
                eff = (f / denom - 1) if denom > 0 else 1.0
                COST["thread_efficiency"] = float(min(1.0, max(0.0, eff)))
                cal["speedup_2threads"] = r
        cal["est_scale"], cal["thread_efficiency"] = EST_SCALE, COST["thread_efficiency"]
        self.log["calibration"] = cal
        for j in self.jobs:
            j.est_s = j.estimate(j.threads)
            self.records[j.name]["est_s"] = round(j.est_s * self.est_scale, 1)
        print(f"[{self.elapsed():6.0f} s] calibrated: {cal.get('est_scale'):.3f} x this VM's step time "
              f"(1 thread, every core busy), 2-thread speed-up {cal.get('speedup_2threads', float('nan')):.2f}", flush=True)
        self.write()

    def _on_signal(self, signum, frame) -> None:
        self.stop_reason = f"driver got signal {signum}"

    def run(self) -> int:
        self.stop_reason = ""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self.write()
        if self.do_calibrate and self.jobs:
            self.calibrate(timeout=min(45.0, 0.1 * self.deadline_s))
        pending = order(self.jobs)
        running, cores_free = [], self.workers
        while True:
            now = time.monotonic()
            if now >= self.kill_at or self.stop_reason:
                self.kill_all(running)
                for st in running:
                    st["stage_walls"].append(round(time.monotonic() - st["t_stage"], 1))
                    self.finish(st, "killed at deadline" if not self.stop_reason else f"killed ({self.stop_reason})")
                running = []
                break
            for st in list(running):
                rc = st["proc"].poll()
                if rc is None:
                    continue
                st["stage_walls"].append(round(time.monotonic() - st["t_stage"], 1))
                if rc == 0 and st["stage"] + 1 < len(st["cmds"]):
                    st["stage"] += 1
                    st["t_stage"] = time.monotonic()
                    self.start_stage(st)
                    continue
                running.remove(st)
                cores_free += st["threads"]
                self.finish(st, "done" if rc == 0 else f"failed (exit {rc} in stage {st['stage']})")
            left = self.kill_at - time.monotonic()
            for j in list(pending):
                if j.gpu and sum(r["job"].gpu for r in running) >= self.gpu_slots:
                    continue
                t = j.fit(cores_free, left, self.est_scale)
                if not t:
                    continue
                pending.remove(j)
                cores_free -= t
                ck, js = self.tmp / f"ckpt_{j.name}", self.tmp / f"json_{j.name}"
                js.mkdir()
                st = {"job": j, "threads": t, "cmds": j.commands(ck, js), "stage": 0, "ckpt": ck, "json": js,
                      "fh": open(self.log_dir / f"{j.name}.log", "w"), "t_start": time.monotonic(),
                      "stage_walls": []}
                st["t_stage"] = st["t_start"]
                rec = self.records[j.name]
                rec.update(status="running", threads=t, est_s=round(j.estimate(t) * self.est_scale, 1))
                self.start_stage(st)
                running.append(st)
                print(f"[{self.elapsed():6.0f} s] start {j.name} ({t} thread(s), "
                      f"estimated {rec['est_s']:.0f} s)", flush=True)
            if not running:
                break
            time.sleep(0.5)
        if self.stop_reason:
            print(f"stopped early: {self.stop_reason}", flush=True)
        for j in pending:
            self.records[j.name]["status"] = "not started (would not finish before the deadline)"
            self.records[j.name]["est_s"] = round(j.estimate(j.threads) * self.est_scale, 1)
        self.pack()
        self.write(final=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        s = self.log["summary"]
        print(f"{s['done']} of {s['jobs']} jobs done in {self.elapsed():.0f} s; measured/estimated wall "
              f"{s['measured_over_estimated']}; results in {self.out}", flush=True)
        return 0


def merge(folder: Path, force: bool = False) -> int:
    src = folder / "runs.tar.gz"
    if not src.exists():
        print(f"error: {src} does not exist; pass the folder a batch wrote with --out")
        return 2
    RUNS_JSON.mkdir(parents=True, exist_ok=True)
    added, kept = [], []
    with tarfile.open(src, "r:gz") as tar:
        for m in tar.getmembers():
            if not (m.isfile() and m.name.startswith("turbosparse/") and m.name.endswith(".json")):
                continue
            dst = RUNS_JSON / Path(m.name).name
            if dst.exists() and not force:
                kept.append(dst.name)
                continue
            dst.write_bytes(tar.extractfile(m).read())
            added.append(dst.name)
    print(f"merged {len(added)} run JSONs into {RUNS_JSON}" + (f"; kept {len(kept)} existing" if kept else ""))
    for a in added:
        print("  +", a)
    return 0


def dry_run(plan: str, jobs: List[Job], workers: int, deadline_s: float, est_scale: float, gpu_slots: int = 5) -> int:
    """Print the plan's jobs and estimated core-minutes; for A/B/C, the simulated schedule of
    this call and of the calls before it (B assumes A's simulated jobs were done and merged)."""
    calls = ["A", "B", "C"][: "ABC".index(plan.upper()) + 1] if plan.upper() in ("A", "B", "C") else [plan]
    core_min = sum(j.estimate(j.threads) * j.threads for j in jobs) * est_scale / 60
    print(f"plan {plan}: {len(jobs)} jobs still to run, {core_min:.1f} estimated core-minutes at their fewest threads; "
          f"one call: {workers} workers x {deadline_s:.0f} s = {workers * deadline_s / 60:.1f} core-minutes; "
          f"estimates x{est_scale} (EST_SCALE {EST_SCALE}, SAFETY {SAFETY})")
    left = list(jobs)
    for c in calls:
        sched = simulate(left, workers, deadline_s - 8.0, est_scale, gpu_slots)
        started = [j for j in order(left) if j.name in sched]
        used = sum((sched[j.name][1] - sched[j.name][0]) * sched[j.name][2] for j in started) / 60
        print(f"\ncall {c}: {len(started)} jobs, {used:.1f} core-minutes "
              f"({used / (workers * deadline_s / 60):.0%} of the call)")
        print(f"  {'prio':>4s}  {'job':56s} {'thr':>3s} {'start':>5s} {'end':>5s}")
        for j in started:
            st, en, t = sched[j.name]
            print(f"  {j.prio:4g}  {j.name:56s} {t:3d} {st:5.0f} {en:5.0f}")
        left = [j for j in left if j.name not in sched]
    if left:
        print(f"\nnot in these calls ({len(left)}): " + ", ".join(f"{j.name} (prio {j.prio:g})" for j in order(left)))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", help="quick, A, B or C")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="cores to use (default: all)")
    ap.add_argument("--deadline-s", type=float, default=520.0, help="the driver exits by this many seconds")
    ap.add_argument("--out", help="folder for batch_log.json and runs.tar.gz")
    ap.add_argument("--est-scale", type=float, default=1.0, help="multiply the time estimates by this")
    ap.add_argument("--gpu", action="store_true",
                    help="also the GPU jobs (swiglu/drelu 3200 steps trained with CuPy, priority above all)")
    ap.add_argument("--gpu-slots", type=int, default=5, help="with --gpu: GPU jobs at a time (default 5)")
    ap.add_argument("--no-calibrate", action="store_true",
                    help="skip the ~15 s probe of the step time on every core that sets the estimates")
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dry-run", action="store_true", help="print the jobs, core-minutes and a simulated schedule")
    ap.add_argument("--all", action="store_true", help="also jobs whose result JSON exists already")
    ap.add_argument("--only", metavar="GLOBS",
                    help="only the jobs whose key matches one of these comma-separated globs, run in the globs' "
                         "order (e.g. 'tiny_L8_*_seed[12],*_lr0.01_seed1')")
    ap.add_argument("--merge", metavar="DIR", help="unpack DIR/runs.tar.gz's run JSONs into bench/results/turbosparse")
    ap.add_argument("--force", action="store_true", help="--merge: overwrite existing run JSONs")
    args = ap.parse_args(argv)
    if args.probe:
        print(json.dumps(probe()))
        return 0
    if args.merge:
        return merge(Path(args.merge), args.force)
    if not args.plan:
        print("error: --plan is required (quick, A, B or C), or --merge DIR")
        return 2
    if args.workers < 1 or args.deadline_s <= 10:
        print("error: --workers must be >= 1 and --deadline-s > 10")
        return 2
    jobs = plan_jobs(args.plan, skip_existing=not args.all, gpu=args.gpu)
    if args.only is not None:
        jobs = select(jobs, args.only)
    if args.dry_run:
        return dry_run(args.plan, jobs, args.workers, args.deadline_s, args.est_scale, args.gpu_slots)
    if not args.out:
        print("error: --out is required (the folder for batch_log.json and runs.tar.gz)")
        return 2
    if not jobs:
        print(f"plan {args.plan}: nothing to do (every job's result exists; --all runs them again)")
    b = Batch(jobs, args.workers, args.deadline_s, Path(args.out), args.est_scale, args.plan, args.gpu_slots)
    b.do_calibrate = not args.no_calibrate and args.plan.upper() != "QUICK"
    return b.run()


if __name__ == "__main__":
    sys.exit(main())
