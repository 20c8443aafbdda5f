"""Mutants mutmut cannot make: the routing kernel's two callers and the cached certified
count are decorated (``torch.no_grad``, ``functools.lru_cache``), and mutmut 3 leaves
decorated functions alone; the kernel's own mutants (``cascade/deploy/kernel.py``) are
here too, each run against the kernel's property tests and both callers' tests. ``make mutate`` runs this after mutmut.

Each mutant is one textual change, applied to a copy of the repository in a temporary
folder (the working tree is never touched); the tests that cover the function then run
in that copy and must fail. Prints one line per mutant and exits 1 if any survives.

    python tests/mutants_by_hand.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COPY = ("cascade", "tasks", "baselines", "configs", "tests", "pyproject.toml")
BUNDLE_TESTS = ["tests/test_wrong_answers.py", "-k", "bundle"]
ROUTER_TESTS = ["tests/test_wrong_answers.py", "-k", "router", "tests/test_multistage.py::test_router_matches_the_full_forward"]
KERNEL = "cascade/deploy/kernel.py"
KERNEL_TESTS = ["tests/test_routing_kernel.py", "tests/test_wrong_answers.py", "-k", "kernel or bundle or router"]
CERTIFIED_TESTS = ["tests/test_guarantee.py", "tests/test_wrong_answers.py", "-k", "not quick_run and not report_without"]

#: (name, file, the text, its replacement, the tests to run)
MUTANTS = [
    ("route_rows: > for >=", KERNEL, "stop = q >= threshold  # [m]", "stop = q > threshold  # [m]", KERNEL_TESTS),
    ("route_rows: stage 0's threshold everywhere", KERNEL, "stop = q >= threshold  # [m]",
     "stop = q >= thresholds[0]  # [m]", KERNEL_TESTS),
    ("route_rows: compared in the stage's precision", KERNEL, "q = q.double()", "q = q", KERNEL_TESTS),
    ("route_rows: rows that stopped go on", KERNEL, "active = active[~stop]", "active = active[stop]", KERNEL_TESTS),
    ("route_rows: exit stage always the last", KERNEL, "exit_stage[active] = torch.where(stop, k, last)",
     "exit_stage[active] = torch.where(stop, last, last)", KERNEL_TESTS),
    ("route_rows: every stage on the whole batch", KERNEL, "output, q = stage(x if k == 0 else x[active])",
     "output, q = stage(x)", KERNEL_TESTS),
    ("Bundle.route: cost not summed", "cascade/deploy/bundle.py", "mflops[v.rows] += self.stage_mflops[v.stage]",
     "mflops[v.rows] = self.stage_mflops[v.stage]", BUNDLE_TESTS),
    ("Bundle.route: the last stage's cost not counted", "cascade/deploy/bundle.py",
     "mflops[active] += self.stage_mflops[last]", "mflops[active] += 0.0", BUNDLE_TESTS),
    ("Bundle.route: the last stage not run", "cascade/deploy/bundle.py",
     "output[active] = self._last(x[active])[0].float()", "pass", BUNDLE_TESTS),
    ("Bundle.route: pending rows not marked", "cascade/deploy/bundle.py", "pending[active] = True", "pending[active] = False",
     BUNDLE_TESTS),
    ("Bundle.route: the score kept is the first stage's", "cascade/deploy/bundle.py", "score[v.rows] = v.score",
     "score[v.rows] = torch.where(torch.isnan(score[v.rows]), v.score, score[v.rows])", BUNDLE_TESTS),
    ("Bundle.route: a pending row keeps the first answer", "cascade/deploy/bundle.py",
     "output[v.rows] = v.output.float()", "output[v.rows] = torch.where(output[v.rows].isnan(), v.output.float(), "
     "output[v.rows])", BUNDLE_TESTS),
    ("Router.forward: rows that went on answered", "cascade/deploy/router.py",
     "output[v.rows] = torch.where(keep, v.output.to(output.dtype), float(\"nan\"))",
     "output[v.rows] = v.output.to(output.dtype)", ROUTER_TESTS),
    ("Router.forward: the big network not run", "cascade/deploy/router.py", "if self.big is not None and len(active):",
     "if False:", ROUTER_TESTS),
    ("_certified_losses: one count too many", "cascade/evaluation/guarantee.py",
     'return int(np.searchsorted(p, level, side="right")) - 1', 'return int(np.searchsorted(p, level, side="right"))',
     CERTIFIED_TESTS),
    ("_certified_losses: p < level for p <= level", "cascade/evaluation/guarantee.py",
     'return int(np.searchsorted(p, level, side="right")) - 1', 'return int(np.searchsorted(p, level, side="left")) - 1',
     CERTIFIED_TESTS),
]


def main() -> int:
    survived = []
    with tempfile.TemporaryDirectory(prefix="cascade-mutants-") as tmp:
        root = Path(tmp)
        for name in COPY:
            src = REPO / name
            if src.is_dir():
                shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(src, root / name)
        for label, file, old, new, tests in MUTANTS:
            path = root / file
            original = path.read_text()
            if original.count(old) != 1:
                print(f"STALE    {label}: {file} no longer has {old!r} exactly once")
                survived.append(label)
                continue
            path.write_text(original.replace(old, new))
            try:
                done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:randomly", "-p",
                                       "no:cacheprovider", *tests], cwd=root, capture_output=True, text=True)
            finally:
                path.write_text(original)
            killed = done.returncode == 1
            print(f"{'killed ' if killed else 'SURVIVED'} {label}" + ("" if killed or done.returncode == 0
                                                                     else f" (pytest exit {done.returncode})"))
            if not killed:
                survived.append(label)
    print(f"{len(MUTANTS) - len(survived)}/{len(MUTANTS)} hand-made mutants killed")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
