"""Copy the reports the experiment scripts wrote under ``experiments/outputs/`` into ``experiments/RESULTS.md``.

Each report goes between its own ``<!-- <name>:start -->`` / ``<!-- <name>:end -->`` markers (replaced on rerun,
appended the first time); its PNG figures are copied to ``experiments/figures/`` with the links rewritten.

    python experiments/collect_results.py                       # every report that exists
    python experiments/collect_results.py --only ablation,tune_cifar
"""
from __future__ import annotations

import argparse
import pathlib
import re
import shutil

HERE = pathlib.Path(__file__).resolve().parent
OUTPUTS = HERE / "outputs"
#: name -> (report markdown, figures it refers to)
REPORTS = {
    "ablation": (OUTPUTS / "ablation" / "ablation.md", ("ablation_remove.png", "ablation_add.png")),
    "tune_cifar": (OUTPUTS / "tune_cifar" / "tune_cifar.md", ("tune_cifar.png",)),
    "transfer_table": (HERE / "results" / "transfer_table" / "transfer_table.md", ()),
}


def section(name: str, report: pathlib.Path, figures: tuple[str, ...], figure_dir: pathlib.Path) -> str:
    """The report's markdown, headings demoted one level, figures copied and linked from RESULTS.md."""
    text = report.read_text().strip()
    text = re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", text, flags=re.M)
    figure_dir.mkdir(parents=True, exist_ok=True)
    for fig in figures:
        src = report.parent / fig
        if src.exists():
            shutil.copyfile(src, figure_dir / fig)
            link = f"figures/{fig}"
            if fig in text:
                text = re.sub(rf"\]\([^)]*{re.escape(fig)}\)", f"]({link})", text)
            else:
                text += f"\n\n![{fig[:-4]}]({link})"
    return f"<!-- {name}:start -->\n{text}\n<!-- {name}:end -->"


def insert(results: str, name: str, block: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start in results and end in results:
        return results[: results.index(start)] + block + results[results.index(end) + len(end):]
    return results.rstrip() + "\n\n" + block + "\n"


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(REPORTS), help="comma-separated subset of " + ", ".join(REPORTS))
    p.add_argument("--results_md", default=str(HERE / "RESULTS.md"))
    p.add_argument("--figures", default=str(HERE / "figures"))
    args = p.parse_args(argv)
    results_md = pathlib.Path(args.results_md)
    text = results_md.read_text() if results_md.exists() else "# Results\n"
    done = []
    for name in [n.strip() for n in args.only.split(",") if n.strip()]:
        report, figures = REPORTS[name]
        if not report.exists():
            print(f"[{name}] no report at {report}; skipped")
            continue
        text = insert(text, name, section(name, report, figures, pathlib.Path(args.figures)))
        done.append(name)
        print(f"[{name}] copied into {results_md}")
    results_md.write_text(text)
    return done


if __name__ == "__main__":
    main()
