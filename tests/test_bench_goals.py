"""``normkit bench --goals``: the goals table covers the registry, the command prints every column and
a verdict per goal, compile failures and a missing timm stay in their rows. No timed assertion."""

from __future__ import annotations

import json
import platform
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

import normkit as nk
from normkit import _bench as B
from normkit._bench import goalrun, goals
from normkit._bench.conditioned import build_method
from normkit._bench.reference import Lambda
from normkit._bench.timing import load_warning, saved_bytes, time_call


def test_goals_table_covers_every_registered_method() -> None:
    names, families = set(nk.list_methods()), set(nk.list_families())
    for g in goals.GOALS:  # every row selects something that exists
        assert g.figure in goals.FIGURES and g.limit > 0 and g.wording
        if g.applies_to.startswith("family:"):
            assert g.applies_to.removeprefix("family:") in families, g
        else:
            assert g.applies_to == "*" or g.applies_to in names, g
    for m in names:
        got = goals.goals_for(m)
        assert {"compiled", "peer", "eval", "eval/mm", "saved"} <= set(got), m
        eager = [f for f in ("eager", "eager/LRN") if f in got]
        assert len(eager) == 1, (m, eager)  # exactly one eager goal, from the family or the method
        assert (eager == ["eager/LRN"]) == (nk.info(m).family == "local"), m
    assert set(goals.PEERS) <= names


@pytest.mark.parametrize(("method", "figure", "limit"), [
    # issue 20's goals, as it words them
    ("bn", "eager", 2.0), ("l1_bn", "eager", 2.0), ("frn", "eager", 2.0), ("ghost_bn", "eager", 2.0),
    ("dbn", "eager", 1.8), ("cd_bw", "eager", 1.8), ("iternorm", "eager", 1.8),
    ("pca_bw", "eager", 2.5), ("group_whitening", "eager", 4.0), ("instance_whitening", "eager", 4.0),
    ("switchable_whitening", "eager", 4.0), ("mixture_norm", "eager", 4.0),
    ("lcn", "eager/LRN", 2.0), ("divisive_norm", "eager/LRN", 2.0),
    ("iternorm", "compiled", 1.2), ("evonorm_s0", "peer", 1.0), ("bn", "eval", 1.1),
    ("dbn", "eval/mm", 1.2), ("gn", "saved", 1.0),
])
def test_goal_limits_are_the_issues(method: str, figure: str, limit: float) -> None:
    assert goals.goals_for(method)[figure].limit == limit


def test_verdicts() -> None:
    g = goals.goals_for("bn")["eager"]
    assert [goals.verdict(v, g) for v in (1.5, 2.0, 2.004, 2.006, 2.5, None, float("nan"))] == [
        "met", "met", "met", "missed", "missed", "n/a", "n/a"]  # judged as printed, 2 decimals
    assert goals.verdict(None, g, error="RuntimeError: boom") == "missed"
    assert goals.verdict(1.0, None) == "n/a"


def test_every_method_builds_as_a_module_of_x() -> None:
    """Conditional methods get a fixed condition; every method runs forward + backward."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, 4, 4, requires_grad=True)
    for m in nk.list_methods():
        y = build_method(m, x.detach(), gen).train()(x)
        assert y.shape == x.shape, m
        (gx,) = torch.autograd.grad(y.sum(), x)
        assert torch.isfinite(gx).all(), m


def test_timm_peers_compute_what_normkit_does() -> None:
    """A peer ratio compares equal computations: same output in training, same parameters."""
    layers = pytest.importorskip("timm.layers")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, 5, 5, generator=gen)
    for method, peer in goals.PEERS.items():
        if peer.source != "timm":
            continue  # a torch reference: test_torch_reference_peers_compute_what_normkit_does
        ours = build_method(method, x, gen, **peer.kwargs).train()
        eps = ours.eps if ours.eps is not None else torch.finfo(x.dtype).eps
        theirs = getattr(layers, peer.cls)(32, eps=eps, **peer.timm_kwargs).train()
        torch.testing.assert_close(ours(x), theirs(x), atol=2e-6, rtol=1e-5, msg=method)
        assert {n for n, _ in ours.named_parameters()} == {n for n, _ in theirs.named_parameters()}


def test_torch_reference_peers_compute_what_normkit_does() -> None:
    """SPADE's peer, the paper's code in plain torch on normkit's own conv net: the same output,
    input gradient and running statistics in training."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, 6, 6, generator=gen, requires_grad=True)
    refs = {m: p for m, p in goals.PEERS.items() if p.source == "torch"}
    assert set(refs) == {"spade"}
    for method in refs:
        ours = build_method(method, x.detach(), gen).train()
        _, theirs, _ = goalrun._peer(method, x.detach(), ours, gen, None)
        assert theirs is not None
        theirs.train()
        y, yr = ours(x), theirs(x)
        torch.testing.assert_close(yr, y, atol=2e-6, rtol=1e-5, msg=method)
        g = torch.randn(y.shape, generator=gen)
        torch.testing.assert_close(torch.autograd.grad(yr, x, g)[0],
                                   torch.autograd.grad(y, x, g)[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(theirs.inner.bn.running_var, ours.inner.running_var)


def test_exempt_goals_are_listed_with_why_and_not_judged() -> None:
    r = goalrun.run_goals(["2x8x3x3"], ["spade"], repeats=1, compile_=False, log=lambda s: None)
    (row,) = r["rows"]
    verdicts = {g["figure"]: g["verdict"] for g in row["goals"]}
    assert verdicts["eager"] == verdicts["saved"] == "exempt"
    assert verdicts["peer"] in ("met", "missed") and row["figures"]["peer"] > 0
    assert r["goals"]["judged"] == 1  # the peer alone
    assert all(g["why"] == goals.EXEMPT[("spade", g["figure"])]
               for g in row["goals"] if g["verdict"] == "exempt")
    text = goalrun.goals_report(r)
    assert "exempt (spade: eager, saved)" in text and "torch SPADEReference" in text


def test_goals_command_prints_every_column_and_a_verdict(tmp_path, capsys) -> None:
    """Two tiny shapes, three methods: one with a timm peer, one whitening, one local."""
    pytest.importorskip("timm")
    path = tmp_path / "g.json"
    rc = B.main(["--goals", "--shapes", "4x16x4x4", "2x32x3x3", "--methods", "frn,dbn,lcn",
                 "--repeats", "1", "--plain", "--compile-backend", "aot_eager", "--json", str(path),
                 "--allocator", "default"])  # steady: process-wide, test_steady_allocator
    assert rc == 0
    out = capsys.readouterr().out
    for column in ("x BN", "comp x cBN", "x peer", "eval x BN", "eval x mm", "x LRN", "saved/in",
                   "goals", "verdict", "target", "ratios are from one run"):
        assert column in out, column
    r = json.loads(path.read_text())
    assert r["config"]["allocator"] == "as the process found it"
    assert r["config"]["threads"] == 1 and r["config"]["shapes"] == ["4x16x4x4", "2x32x3x3"]
    rows = {(x["method"], x["shape"]): x for x in r["rows"]}
    assert set(rows) == {(m, s) for m in ("frn", "dbn", "lcn") for s in ("4x16x4x4", "2x32x3x3")}
    for (method, _), row in rows.items():
        assert not row["errors"], row["errors"]
        f = row["figures"]
        for figure in ("eager", "compiled"):
            assert f[figure] is not None and f[figure] > 0, (method, figure)
        assert f["saved"] is not None and f["saved"] >= 0  # LCN's Function: 0 beyond statistics
        judged = {g["figure"]: g for g in row["goals"]}
        assert all(g["verdict"] in ("met", "missed") for g in judged.values()), judged
        assert all(g["verdict"] == ("met" if round(g["value"], goals.DECIMALS) <= g["limit"]
                                    else "missed") for g in judged.values())
        assert {"eager/LRN" if method == "lcn" else "eager", "compiled", "saved"} <= set(judged)
    frn, dbn, lcn = (rows[(m, "4x16x4x4")] for m in ("frn", "dbn", "lcn"))
    assert frn["peer"] == "FilterResponseNormTlu2d" and "peer" in {g["figure"] for g in frn["goals"]}
    assert dbn["eval_kind"] == "matrix" and dbn["figures"]["eval/mm"] is not None
    assert lcn["lrn_window"] == "C/1x7x7" and lcn["figures"]["eager/LRN"] is not None
    assert r["goals"]["judged"] == sum(len(x["goals"]) for x in r["rows"])
    assert B.main(["--from-json", str(path), "--plain"]) == 0  # a saved run prints again
    assert "goals of issue 20" in capsys.readouterr().out


def test_compile_failure_stays_in_its_row(monkeypatch) -> None:
    real = torch.compile

    class Failing(nn.Module):  # what a compiled module that cannot trace does on its first call
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("graph break in a custom Function\nfrom user code: ...")

    def failing(mod: nn.Module, **kw):  # torch BN compiles; normkit's fails with two lines
        return real(mod, **kw) if isinstance(mod, nn.BatchNorm2d) else Failing()

    monkeypatch.setattr(torch, "compile", failing)
    r = goalrun.run_goals(["2x8x3x3"], ["bn"], repeats=1, backend="aot_eager", log=lambda s: None)
    (row,) = r["rows"]
    assert row["errors"] == {"compiled": "RuntimeError: graph break in a custom Function"}
    (g,) = [g for g in row["goals"] if g["figure"] == "compiled"]
    assert g["verdict"] == "missed" and g["value"] is None
    assert row["figures"]["eager"] is not None  # the rest of the row is measured
    assert "error: RuntimeError: graph break" in goalrun.goals_report(r)


def test_a_method_that_fails_misses_its_goals_with_the_error(monkeypatch) -> None:
    def broken(method: str, x: torch.Tensor, gen: torch.Generator, **kw) -> nn.Module:
        raise RuntimeError("cannot build\ntraceback ...")

    monkeypatch.setattr(goalrun, "build_method", broken)
    r = goalrun.run_goals(["2x8x3x3"], ["gn"], repeats=1, compile_=False, log=lambda s: None)
    (row,) = r["rows"]
    assert row["errors"] == {"ours": "RuntimeError: cannot build"}
    assert {g["figure"]: g["verdict"] for g in row["goals"]} == {"eager": "missed", "saved": "missed"}


def test_without_timm_the_peer_is_left_out_with_a_note(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    monkeypatch.setitem(sys.modules, "timm.layers", None)
    r = goalrun.run_goals(["2x8x3x3"], ["frn"], repeats=1, compile_=False, log=lambda s: None)
    (row,) = r["rows"]
    assert "peer" not in row["medians_ms"]["fb-train"] and "peer" not in row
    assert any("timm is not installed" in w for w in r["warnings"])
    assert [g["verdict"] for g in row["goals"] if g["figure"] == "peer"] == ["n/a"]


def test_an_exhausted_budget_skips_compilation_and_says_so() -> None:
    r = goalrun.run_goals(["2x8x3x3"], ["gn"], repeats=2, max_seconds=0.0, statistic="min",
                          log=lambda s: None)
    (row,) = r["rows"]
    fb = row["min_ms"]["fb-train"]  # statistic="min": ratios of the minima
    assert row["figures"]["eager"] == fb["ours"] / fb["bn"]
    assert "compiled" not in row["medians_ms"]["fb-train"]
    assert [g["verdict"] for g in row["goals"] if g["figure"] == "compiled"] == [
        "not run (--max-minutes)"]
    assert any("compilation skipped" in w for w in r["warnings"])
    assert row["figures"]["eager"] is not None  # the eager columns are still measured


def test_saved_bytes_tells_statistics_from_activations() -> None:
    """``exp(x) * mean(x)``: autograd keeps exp(x) (input-sized) and the (N, C, 1, 1) means."""
    x = torch.randn(3, 4, 5, 5)
    m = Lambda(lambda t: t.exp() * t.mean((2, 3), keepdim=True))
    got = saved_bytes(m, x, stats_numel=3 * 4)
    assert got["saved_extra_bytes"] == x.nbytes + 3 * 4 * 4
    assert got["saved_stats_bytes"] == 3 * 4 * 4
    assert saved_bytes(m, x)["saved_stats_bytes"] == 0


def test_load_warning_and_timing_helpers() -> None:
    assert "loaded" in load_warning([3.0, 2.0, 1.0], cores=2, threads=1)
    assert load_warning([0.2, 0.2, 0.2], cores=2, threads=1) is None
    assert load_warning([1.2, 1.0, 1.0], cores=2, threads=1, own=1.0) is None  # the run itself
    assert load_warning(None, cores=2, threads=1) is None
    assert time_call(lambda: None) >= 0.0


def test_cuda_calls_are_timed_between_two_events(monkeypatch) -> None:
    """The protocol of ``time_call`` on CUDA, with torch.cuda stubbed (no GPU here): drain the
    queue, record ``start``, run, record ``end``, wait for ``end``, read ``start.elapsed_time(end)``."""
    calls: list[str] = []

    class Event:
        def __init__(self, enable_timing: bool = False) -> None:
            assert enable_timing
            self.name = "start" if not any(c.endswith("new") for c in calls) else "end"
            calls.append(f"{self.name} new")

        def record(self) -> None:
            calls.append(f"{self.name} record")

        def synchronize(self) -> None:
            calls.append(f"{self.name} wait")

        def elapsed_time(self, end: Event) -> float:
            calls.append(f"{self.name} to {end.name}")
            return 2.5

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("sync"))
    assert time_call(lambda: calls.append("run"), torch.device("cuda")) == 2.5
    assert calls == ["sync", "start new", "end new", "start record", "run", "end record",
                     "end wait", "start to end"]


def test_goals_bad_arguments(capsys) -> None:
    assert B.main(["--goals", "--shapes", "16x32", "--json", "/dev/null", "--allocator",
                   "default"]) == 2
    assert "NCHW" in capsys.readouterr().err
    assert B.main(["--goals", "--methods", "not_a_norm", "--json", "/dev/null"]) == 2
    if not torch.cuda.is_available():
        assert B.main(["--goals", "--device", "cuda", "--json", "/dev/null"]) == 2
        assert "cuda" in capsys.readouterr().err
    assert B.main(["--device", "cuda", "--json", "/dev/null"]) == 2  # --goals only
    with pytest.raises(ValueError, match="statistic must be"):
        goalrun.run_goals(["2x8x3x3"], ["gn"], statistic="mean")


def test_lrn_reference_takes_the_local_methods_window() -> None:
    """"x LRN" of LCN / divisive normalization: torch's LRN computation over the method's window
    (zero padded, its constants), not a channel window of the window's side."""
    import torch.nn.functional as F

    import normkit as nk
    from normkit._bench.reference import lrn_at_window

    x = torch.randn(2, 4, 6, 5, dtype=torch.float64)
    ref, label = lrn_at_window("divisive_norm", nk.create("divisive_norm", 4, sigma=2.0))
    sq = F.avg_pool2d(x * x, 3, stride=1, padding=1, count_include_pad=True)
    assert label == "1x3x3"
    torch.testing.assert_close(ref(x), x / (4.0 + sq).sqrt())
    ref, label = lrn_at_window("lcn", nk.create("lcn", 4, num_groups=2, window=5))
    group = (x * x).reshape(2, 2, 2, 6, 5).mean(2)
    sq = F.avg_pool2d(group, 5, stride=1, padding=2, count_include_pad=True)
    assert label == "C/2x5x5"
    want = x / (1e-5 + sq.repeat_interleave(2, dim=1)).sqrt()
    torch.testing.assert_close(ref(x), want)


def test_compiled_rows_time_copies_of_the_eager_modules(monkeypatch) -> None:
    """The compiled rows compile copies: with a module shared with the eager rows, normkit bn
    read 1.5-1.85x compiled torch BN in the bench's loop (1.02x with copies)."""
    real, compiled = torch.compile, []
    built = []
    real_build = goalrun.build_method

    def build(*a, **kw):
        built.append(real_build(*a, **kw))
        return built[-1]

    def record(mod: nn.Module, **kw):
        compiled.append(mod)
        return real(mod, **kw)

    monkeypatch.setattr(goalrun, "build_method", build)
    monkeypatch.setattr(torch, "compile", record)
    r = goalrun.run_goals(["2x8x3x3"], ["bn"], repeats=1, backend="aot_eager", log=lambda s: None)
    assert r["rows"][0]["figures"]["compiled"] is not None and len(compiled) == 2
    assert all(m is not b for m in compiled for b in built)
    assert any(type(m) is type(built[0]) for m in compiled)  # a copy of the method's module


def test_parity_run_compares_every_tensor_and_passes_cpu_against_itself(tmp_path, capsys) -> None:
    """``bench --parity``: on the CPU the device copy is a second CPU copy, so every method matches
    exactly; every step's output, gradients, buffers and eval output are compared."""
    from normkit._bench.parity import run_parity

    r = run_parity(None, "cpu", shape="2x8x3x3")
    assert {row["method"] for row in r["rows"]} == set(nk.list_methods())
    assert r["ok"], [row for row in r["rows"] if not row["ok"]]
    bn = next(row for row in r["rows"] if row["method"] == "bn")
    assert bn["compared"] == 7  # y, dx, dweight, dbias, running mean and var, eval y
    path = tmp_path / "p.json"
    assert B.main(["--parity", "--methods", "bn,spade", "--shapes", "2x8x3x3", "--plain",
                   "--json", str(path)]) == 0
    assert "2/2 methods match on cpu" in capsys.readouterr().out
    assert json.loads(path.read_text())["ok"] is True


def test_parity_run_reports_a_mismatch_and_exits_1(monkeypatch, tmp_path, capsys) -> None:
    """A layer whose copies compute differently (noise drawn per call) is a MISMATCH naming the
    tensor, and the command exits with 1; a layer that raises keeps its row with the error."""
    from normkit._bench import parity

    class Noisy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.rand(())

    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(parity, "build_method",
                        lambda m, x, gen: Noisy() if m == "bn" else Broken())
    r = parity.run_parity(["bn", "gn"], "cpu", shape="2x4x3x3")
    bn, gn = r["rows"]
    assert not r["ok"] and not bn["ok"] and bn["worst"] in ("y", "eval y") and bn["difference"] > 0
    assert not gn["ok"] and gn["error"] == "RuntimeError: no kernel for this device"
    assert B.main(["--parity", "--methods", "bn", "--shapes", "2x4x3x3", "--plain", "--json",
                   str(tmp_path / "p.json")]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_steady_allocator_is_set_for_the_goals_run_and_said() -> None:
    """In a process of its own (the setting is process-wide): glibc's mallopt takes both values,
    and a goals run records and prints what it set."""
    import subprocess

    code = ("import json, sys; from normkit._bench import main; "
            "sys.exit(main(['--goals', '--shapes', '2x8x3x3', '--methods', 'bn', '--repeats', '1', "
            "'--no-compile', '--plain', '--json', sys.argv[1]]))")
    path = Path(tempfile.mkdtemp()) / "g.json"
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr
    said = json.loads(path.read_text())["config"]["allocator"]
    if sys.platform.startswith("linux") and "glibc" in " ".join(platform.libc_ver()):
        assert said.startswith("glibc mallopt: M_MMAP_THRESHOLD 32 MiB")
        assert "allocator: glibc mallopt" in done.stdout
    else:
        assert said == "as the process found it"
