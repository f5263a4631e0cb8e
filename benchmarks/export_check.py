"""What each GGUF type keeps of a model on a persona's own text, and the writer's memory.

1. **Quantization table.** Writes the model as F16 with ``write_gguf``, quantizes it to every
   ``--quants`` type with ``quantize``, and measures each file against the model in
   transformers (fp32) with ``molting.export.verify`` (the check ``molting export`` runs):
   top-1 agreement and mean/max KL of next-token distributions on the persona's rubric
   questions and dataset. It also says what ``--quant auto`` would choose.
2. **Writer memory** (``--memory``): peak RSS (``/usr/bin/time -v``'s maximum resident set)
   and wall time of ``write_gguf`` F16 in a subprocess, beside llama.cpp's own
   ``convert_hf_to_gguf.py`` on the same directory when ``--llama-cpp`` points at a
   llama.cpp source tree (the one in llama-cpp-python's sdist, under ``vendor/llama.cpp``).

Usage::

    python benchmarks/export_check.py examples/claudio [--model smollm2-135m|DIR] [--adapter A]
        [--quants F16,Q8_0,Q6_K,Q5_K_M,Q4_K_M] [--memory --llama-cpp /path/to/llama.cpp]
        [--work /tmp/export-check] [--out benchmarks/reports/export_check.md]

Prints the table and writes a markdown report with a JSON twin.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

_WRITE = "import sys; from molting.export import write_gguf; write_gguf(sys.argv[1], sys.argv[2])"


def quant_table(persona_dir: Path, model_dir: Path, quants: list[str], work: Path, max_positions: int):
    """The VerifyReport of every type in ``quants`` against ``model_dir``, and the auto choice."""
    from transformers import AutoTokenizer

    from molting.eval import load_rubric
    from molting.export import quantize, write_gguf
    from molting.export.verify import (
        AUTO_CANDIDATES,
        AUTO_MAX_KL,
        FileCheck,
        VerifyReport,
        choose_quant,
        compare_gguf,
        persona_texts,
        reference_logprobs,
    )
    from molting.persona import Persona

    persona = Persona.load(persona_dir)
    texts = persona_texts(persona, load_rubric(persona), AutoTokenizer.from_pretrained(model_dir), max_positions)
    reference = reference_logprobs(model_dir, texts)
    report = VerifyReport(f"{model_dir.name} in transformers (fp32)", len(texts), sum(len(i) - s for i, s in texts))
    f16 = write_gguf(model_dir, work / "model.F16.gguf", system_prompt=persona.system_prompt)
    for quant in quants:
        path = f16 if quant == "F16" else quantize(f16, work / f"model.{quant}.gguf", quant)
        start = time.perf_counter()
        top1, mean_kl, max_kl = compare_gguf(path, texts, reference)
        report.files.append(FileCheck(quant, path.name, path.stat().st_size, top1, mean_kl, max_kl))
        print(f"{quant}: top-1 {top1:.2%}, mean KL {mean_kl:.5f} ({time.perf_counter() - start:.1f} s)", flush=True)
    candidates = [f for f in report.files if f.quant in AUTO_CANDIDATES]
    chosen = choose_quant(candidates, AUTO_MAX_KL)
    report.chosen, report.auto_max_kl = (chosen.quant if chosen else "F16"), AUTO_MAX_KL
    return report


def peak_rss(command: list[str]) -> dict:
    """Peak RSS (MiB) and wall time (s) of ``command`` under ``/usr/bin/time -v``."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)[1])
    return {"peak_rss_mib": round(kib / 1024), "wall_s": round(wall, 1)}


def memory(model_dir: Path, work: Path, llama_cpp: Path | None) -> dict:
    """``write_gguf`` F16 vs ``convert_hf_to_gguf.py --outtype f16``, each in its own process."""
    rows = {"molting write_gguf": peak_rss([sys.executable, "-c", _WRITE, str(model_dir), str(work / "m.gguf")])}
    if llama_cpp:
        convert = [sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", "f16"]
        rows["llama.cpp convert_hf_to_gguf.py"] = peak_rss([*convert, "--outfile", str(work / "c.gguf")])
        rows["same tensors"] = same_tensors(work / "m.gguf", work / "c.gguf")
    return rows


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two GGUF files hold the same tensors: names, types and bytes."""
    import gguf
    import numpy as np

    ta = {t.name: t for t in gguf.GGUFReader(a).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(b).tensors}
    return set(ta) == set(tb) and all(
        ta[n].tensor_type == tb[n].tensor_type and np.array_equal(ta[n].data, tb[n].data) for n in ta
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("persona", type=Path)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapter", type=Path, help="merge this LoRA adapter into the model first")
    parser.add_argument("--quants", default="F16,Q8_0,Q6_K,Q5_K_M,Q4_K_M")
    parser.add_argument("--max-positions", type=int, default=1024)
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--llama-cpp", type=Path)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "reports" / "export_check.md")
    args = parser.parse_args()

    from molting.export import merge_adapter
    from molting.models import resolve_base_model

    work = args.work or Path(tempfile.mkdtemp(prefix="molting-export-check-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_base_model(args.model)
    if args.adapter:
        model_dir = merge_adapter(model_dir, args.adapter, work / "merged")
    report = quant_table(args.persona, model_dir, args.quants.split(","), work, args.max_positions)
    result = {"model": str(model_dir), "adapter": str(args.adapter), "check": report.to_dict()}
    text = f"# Export check: {args.persona} on {model_dir.name}\n\n{report.to_markdown()}"
    if args.memory:
        result["memory"] = memory(model_dir, work, args.llama_cpp)
        text += "\n## Writer memory (F16)\n\n```json\n" + json.dumps(result["memory"], indent=2) + "\n```\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
