"""fastft.threads: each input of the thread decision (affinity, cgroup quota, loader threads,
other processes' load) read from a fake, the decision itself, and the engine's use of it."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fastft import cli, threads
from fastft.engine import Trainer
from fastft.threads import Capacity, CpuSample, choose_threads, cgroup_quota, others_busy

NO_ENV: dict = {}


# --- the decision ---------------------------------------------------------------------------
@pytest.mark.parametrize("capacity, expected", [
    (Capacity(cores=2), 2),                          # quiet 2-core machine: torch's old default
    (Capacity(cores=2, others=1.0), 1),              # one busy neighbour (issue 18: 2.7x for 1 thread)
    (Capacity(cores=2, others=0.4), 2),              # under half a core busy: not a taken core
    (Capacity(cores=2, others=0.6), 1),
    (Capacity(cores=2, others=5.0), 1),              # never below 1
    (Capacity(cores=8, quota=2.0), 2),               # a container's cpu.max on a big host
    (Capacity(cores=8, quota=1.5), 2),               # rounded up: throttling stops all threads together
    (Capacity(cores=8, quota=0.5), 1),
    (Capacity(cores=8, others=3.2, quota=6.0), 5),   # the tighter of free cores and quota
    (Capacity(cores=8, processes_here=4), 2),        # torchrun: the cores split over the processes
    (Capacity(cores=8, side=3), 5),                  # DataLoader workers / DALI threads beside the step
    (Capacity(cores=2, side=2), 1),
])
def test_threads_follow_cores_quota_load_processes_and_side_threads(capacity, expected):
    assert choose_threads(capacity, env=NO_ENV).threads == expected


def test_an_override_skips_the_load_reading(monkeypatch):
    monkeypatch.setattr(threads, "measured_capacity", lambda *a: pytest.fail("read the load"))
    assert threads.decide(typed=3, env=NO_ENV).threads == 3
    assert threads.decide(env={"OMP_NUM_THREADS": "2"}).threads == 2


def test_typed_threads_win_then_omp_num_threads():
    busy = Capacity(cores=2, others=1.0)
    assert choose_threads(busy, typed=2, env={"OMP_NUM_THREADS": "1"}) == threads.ThreadChoice(2, "--threads")
    env = {"OMP_NUM_THREADS": "3"}
    assert choose_threads(busy, env=env) == threads.ThreadChoice(3, "OMP_NUM_THREADS=3 in the environment")
    assert choose_threads(busy, env={"OMP_NUM_THREADS": "x"}).threads == 1  # unusable: the policy decides


def test_the_reason_names_every_input():
    line = choose_threads(Capacity(cores=4, quota=2.5, others=1.04, window_s=3.2, processes_here=2, side=1),
                          env=NO_ENV).line()
    assert line == ("threads 1: 4 core(s) in the affinity set, cgroup CPU quota 2.5 core(s), other processes "
                    "busy on 1.0 core(s) over 3.2 s, 2 training processes on this machine, 1 loader "
                    "worker(s)/thread(s) beside the step; --threads N overrides")
    assert "load unknown" in choose_threads(Capacity(cores=2), env=NO_ENV).reason


# --- affinity ---------------------------------------------------------------------------------
def test_cores_are_the_affinity_set_not_the_host(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(threads, "measure_others", lambda since: (0.0, 1.0))
    monkeypatch.setattr(threads, "cgroup_quota", lambda: None)
    assert threads.usable_cpus() == frozenset({0, 3})
    assert threads.measured_capacity().cores == 2


# --- cgroup quotas ----------------------------------------------------------------------------
def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_cgroup_v2_cpu_max_smallest_over_the_cgroup_and_its_parents(tmp_path):
    proc = write(tmp_path / "proc-cgroup", "0::/user.slice/job\n")
    root = tmp_path / "cg"
    write(root / "user.slice/job/cpu.max", "150000 100000\n")
    assert cgroup_quota(root, proc) == 1.5
    write(root / "user.slice/cpu.max", "50000 100000\n")
    assert cgroup_quota(root, proc) == 0.5
    write(root / "user.slice/cpu.max", "max 100000\n")
    write(root / "user.slice/job/cpu.max", "max 100000\n")
    assert cgroup_quota(root, proc) is None


def test_cgroup_v2_in_a_container_that_sees_its_cgroup_as_root(tmp_path):
    proc = write(tmp_path / "proc-cgroup", "0::/\n")
    write(tmp_path / "cg/cpu.max", "200000 100000\n")
    assert cgroup_quota(tmp_path / "cg", proc) == 2.0


def test_cgroup_v1_cfs_quota_over_period(tmp_path):
    proc = write(tmp_path / "proc-cgroup", "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n")
    folder = tmp_path / "cg/cpu,cpuacct/docker/abc"
    write(folder / "cpu.cfs_quota_us", "250000\n")
    write(folder / "cpu.cfs_period_us", "100000\n")
    assert cgroup_quota(tmp_path / "cg", proc) == 2.5
    write(folder / "cpu.cfs_quota_us", "-1\n")  # v1's "no limit"
    assert cgroup_quota(tmp_path / "cg", proc) is None


def test_no_cgroup_files_means_no_quota(tmp_path):
    assert cgroup_quota(tmp_path / "absent", tmp_path / "absent-proc") is None
    proc = write(tmp_path / "proc-cgroup", "0::/a\n")
    write(tmp_path / "cg/a/cpu.max", "garbage\n")
    assert cgroup_quota(tmp_path / "cg", proc) is None


# --- other processes' load --------------------------------------------------------------------
STAT = """cpu  900 0 300 5000 100 0 0 0 0 0
cpu0 400 0 100 2000 50 0 0 0 0 0
cpu1 500 0 200 3000 50 10 20 30 0 0
intr 12345
"""


def test_busy_seconds_count_non_idle_ticks_of_the_allowed_cpus_only(tmp_path):
    hz = os.sysconf("SC_CLK_TCK")
    stat = write(tmp_path / "stat", STAT)
    assert CpuSample.take(frozenset({0}), stat).busy == pytest.approx(500 / hz)
    assert CpuSample.take(frozenset({0, 1}), stat).busy == pytest.approx((500 + 760) / hz)
    missing = CpuSample.take(frozenset({0}), tmp_path / "no-stat")
    assert not missing.readable and others_busy(missing, missing) is None


def test_others_busy_is_all_busy_time_less_our_own_over_the_window():
    since = CpuSample(at=10.0, busy=100.0, own=5.0)
    # 2 s wall, 3 s busy on the cores, 1 s of it ours: others kept 1 core busy.
    assert others_busy(since, CpuSample(at=12.0, busy=103.0, own=6.0)) == pytest.approx(1.0)
    # Our own threads alone (2 cores, 2 s): nobody else.
    assert others_busy(since, CpuSample(at=12.0, busy=104.0, own=9.0)) == 0.0
    assert others_busy(since, since) is None  # no window


def test_a_short_window_is_stretched_to_the_minimum():
    others, window = threads.measure_others(CpuSample.take())
    assert window >= threads.MIN_WINDOW_S and (others is None or others >= 0)


# --- the engine ---------------------------------------------------------------------------------
@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_typed_threads_are_set_logged_and_recorded(make_cfg, restore_threads, capsys):
    trainer = Trainer(make_cfg(threads=1)).setup()
    assert torch.get_num_threads() == 1
    assert "threads 1: --threads" in capsys.readouterr().out
    resolved = json.loads((trainer.run_dir / "config.json").read_text())["resolved"]
    assert (resolved["threads"], resolved["threads_reason"]) == (1, "--threads")


def test_auto_threads_come_from_the_measured_capacity_with_the_loaders_workers(
        make_cfg, restore_threads, monkeypatch, capsys):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    seen = {}

    def fake_capacity(since, processes_here, side):
        seen.update(since=since, processes_here=processes_here, side=side)
        return Capacity(cores=4, others=1.0, window_s=2.0, side=side)
    monkeypatch.setattr(threads, "measured_capacity", fake_capacity)
    trainer = Trainer(make_cfg(loader="torch", workers=1)).setup()
    assert seen["side"] == 1 and seen["processes_here"] == 1 and isinstance(seen["since"], CpuSample)
    assert torch.get_num_threads() == 2  # 4 cores - 1 busy - 1 worker
    assert "threads 2: 4 core(s) in the affinity set" in capsys.readouterr().out
    assert json.loads((trainer.run_dir / "config.json").read_text())["resolved"]["threads"] == 2


def test_cli_threads_flag_and_its_check(make_cfg, capsys):
    import fastft.engine as engine
    seen = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "train", lambda cfg, **kw: seen.update(cfg=cfg, **kw))
        assert cli.main(["train", "--data", "synthetic", "--threads", "3"]) == 0
    assert seen["cfg"].threads == 3 and "threads" in seen["typed"] and isinstance(seen["cpu_since"], CpuSample)
    assert cli.main(["train", "--threads", "-1", "--out", str(make_cfg().out)]) == 2
    assert capsys.readouterr().err.strip() == "fastft: error: --threads must be >= 0 (0 = auto), got -1"


def test_a_resumed_run_decides_its_threads_again_unless_typed():
    from fastft.config import TrainConfig
    from fastft.rundir import adopt_saved_config
    saved = TrainConfig(threads=2, lr=0.1).to_dict()
    merged, warnings = adopt_saved_config(TrainConfig(out="r", resume=True), saved, frozenset({"out", "resume"}))
    assert (merged.threads, merged.lr, warnings) == (0, 0.1, [])
    merged, _ = adopt_saved_config(TrainConfig(out="r", resume=True, threads=1), saved,
                                   frozenset({"out", "resume", "threads"}))
    assert merged.threads == 1


# --- the re-check after each epoch ----------------------------------------------------------------
@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr(threads, "usable_cpus", lambda: frozenset({0, 1}))
    monkeypatch.setattr(threads, "cgroup_quota", lambda: None)


def test_a_neighbour_that_came_after_start_up_takes_a_thread_at_the_recheck(two_cores):
    two = threads.ThreadChoice(2, "start-up")
    # 10 s of an epoch, both cores busy, 13.3 s of it ours: 2 threads beside a busy neighbour
    # get 2/3 of a core each, so the neighbour reads as 0.67 core, which counts as one.
    choice = threads.recheck(two, CpuSample(0.0, 0.0, 0.0), CpuSample(10.0, 20.0, 13.3))
    assert choice.threads == 1 and "other processes busy on 0.7 core(s) over 10.0 s" in choice.reason
    # The same count again: nothing to change.
    assert threads.recheck(threads.ThreadChoice(1, "x"), CpuSample(0.0, 0.0, 0.0), CpuSample(10.0, 20.0, 10.0)) is None


def test_a_neighbour_that_left_gives_the_thread_back(two_cores):
    one = threads.ThreadChoice(1, "start-up")
    choice = threads.recheck(one, CpuSample(0.0, 0.0, 0.0), CpuSample(10.0, 10.4, 10.0))  # 0.04 core of others
    assert choice.threads == 2


def test_no_recheck_over_a_window_too_short_or_without_proc_stat(two_cores):
    one = threads.ThreadChoice(1, "start-up")
    assert threads.recheck(one, CpuSample(0.0, 0.0, 0.0), CpuSample(0.1, 0.0, 0.0)) is None
    assert threads.recheck(one, CpuSample(0.0, 0.0, 0.0, readable=False), CpuSample(10.0, 0.0, 0.0)) is None


def _epochs_run(make_cfg, monkeypatch, **overrides) -> tuple[list, list]:
    """(each epoch's recorded threads, the recheck calls) of a 3-epoch run whose recheck says
    1 thread after epoch 1."""
    calls = []

    def fake_recheck(current, since, now, processes_here, side):
        calls.append((current.threads, now.at - since.at >= 0))
        return threads.ThreadChoice(1, "other processes busy on 1.0 core(s) over 9.0 s; x") \
            if current.threads != 1 else None
    monkeypatch.setattr(threads, "recheck", fake_recheck)
    trainer = Trainer(make_cfg(epochs=3, loader="cached", **overrides)).setup()
    trainer.fit()
    lines = (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["threads"] for line in lines], calls


def test_the_engine_rechecks_between_epochs_and_records_each_epochs_count(
        make_cfg, restore_threads, monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "measured_capacity", lambda *a: Capacity(cores=2, others=0.0, window_s=3.0))
    recorded, calls = _epochs_run(make_cfg, monkeypatch, out=str(tmp_path / "auto"))
    assert recorded == [2, 1, 1] and calls == [(2, True), (1, True)]  # not after the last epoch
    assert torch.get_num_threads() == 1
    out = capsys.readouterr().out
    assert "threads 2 -> 1 from the next epoch: other processes busy on 1.0 core(s) over 9.0 s during this one" in out
    recorded, calls = _epochs_run(make_cfg, monkeypatch, threads=2, out=str(tmp_path / "typed"))
    assert recorded == [2, 2, 2] and calls == []  # --threads: never re-checked
