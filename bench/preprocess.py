"""Preprocessing speed: hydralm against the classic HuggingFace `run_clm` pipeline.

Generates a deterministic text corpus (paragraphs of the embedded pydoc corpus, sampled with a
fixed seed into documents; no download), saves it with `save_to_disk`, and times, in this run,
with the same tokenizer and `num_proc`, at N and 2N bytes of text:

- hydralm: what `task=preprocess` runs (`launcher.data.preprocessing.build_and_save`): load, tokenize, pack, save;
- classic: `tokenizer(batch["text"])` in a batched `map`, then `group_texts` (chain the token
  lists, cut into blocks) in a batched `map`, then `save_to_disk`.

Packing alone is the packing stage of each (hydralm's streamed numpy packer vs `group_texts`),
timed inside the same runs. Each line shows wall seconds and the CPU seconds of all processes
(steadier on a shared machine; `--clock cpu` bases the ratios on them). The last three lines are
the ratios the data issue asks for.

    python bench/preprocess.py            # N = 25 MB, 2N = 50 MB
    python bench/preprocess.py --smoke    # seconds
"""

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from itertools import chain
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # num_proc processes do the parallel work

import numpy as np  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
from datasets import Dataset, disable_caching, disable_progress_bars, load_from_disk  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launcher.data.sources import pydoc_documents  # noqa: E402
from launcher.model.modeling import load_tokenizer  # noqa: E402


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and its finished children (the num_proc workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def make_corpus(path: Path, megabytes: float, seed: int = 0) -> None:
    """Documents of 2-12 pydoc paragraphs drawn with a fixed seed, until `megabytes` of text."""
    paragraphs = [p for _, text in pydoc_documents() for p in text.split("\n\n") if p.strip()]
    rng = np.random.default_rng(seed)
    docs, size, target = [], 0, megabytes * 1e6
    while size < target:
        picks = rng.integers(0, len(paragraphs), size=rng.integers(2, 13))
        doc = "\n\n".join(paragraphs[i] for i in picks)
        docs.append(doc)
        size += len(doc.encode())
    Dataset.from_dict({"text": docs}).save_to_disk(str(path))


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import launcher.schema  # noqa: F401  (registers the schema)
    from launcher.cli.validate import check_config

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    check_config(cfg)
    return cfg


def hydralm_run(corpus: Path, out: Path, num_proc: int, max_seq_len: int) -> dict:
    from launcher.data.preprocessing import build_and_save, preprocess_settings
    from launcher.data.sources import source_of

    cfg = compose(["task=preprocess", "data=disk", f"data.load_path={corpus}", f"data.num_proc={num_proc}",
                   "data.packing_type=full", f"train.max_seq_len={max_seq_len}", f"data.save_path={out}"])
    start, cpu_start = time.perf_counter(), cpu_seconds()
    tokenizer = load_tokenizer(cfg.model)
    source = source_of(cfg.data)
    raw = source.splits()
    report = build_and_save(cfg, tokenizer, raw, out, preprocess_settings(cfg, tokenizer, source, raw, "rows"))
    return {"total": time.perf_counter() - start, "total_cpu": cpu_seconds() - cpu_start,
            "pack": report["seconds"]["pack"], "tokens": report["tokens"]}


def classic_run(corpus: Path, out: Path, num_proc: int, max_seq_len: int, tokenizer_dir: str) -> dict:
    """The run_clm recipe, written out: tokenize, group_texts, save."""
    from transformers import AutoTokenizer

    start, cpu_start = time.perf_counter(), cpu_seconds()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    raw = load_from_disk(str(corpus))

    def tokenize_function(batch):
        return tokenizer(batch["text"])

    def group_texts(examples):
        joined = {k: list(chain(*examples[k])) for k in examples.keys()}
        total = (len(joined["input_ids"]) // max_seq_len) * max_seq_len
        result = {k: [t[i:i + max_seq_len] for i in range(0, total, max_seq_len)] for k, t in joined.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    tokenized = raw.map(tokenize_function, batched=True, num_proc=num_proc, remove_columns=["text"])
    pack_start = time.perf_counter()
    grouped = tokenized.map(group_texts, batched=True, num_proc=num_proc)
    pack = time.perf_counter() - pack_start
    grouped.save_to_disk(str(out))
    total, total_cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    tokens = sum(pc.sum(pc.list_value_length(c)).as_py() for c in tokenized.data.column("input_ids").chunks)
    return {"total": total, "total_cpu": total_cpu, "pack": pack, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=25.0, help="N: the smaller corpus size (2N is also run)")
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--smoke", action="store_true", help="a tiny corpus: checks that the benchmark runs")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="end-to-end time for the ratios: wall clock, or CPU seconds of all processes "
                             "(steadier on a shared machine)")
    args = parser.parse_args()
    megabytes = 0.05 if args.smoke else args.megabytes
    disable_caching()
    disable_progress_bars()
    tokenizer_dir = str(ROOT / "launcher" / "assets" / "tiny_bpe")
    with tempfile.TemporaryDirectory(prefix="hydralm-bench-") as tmp:
        os.environ["HYDRALM_CACHE"] = str(Path(tmp) / "cache")
        work = Path(tmp)
        full = work / "corpus-2N"
        make_corpus(full, 2 * megabytes)
        half = work / "corpus-N"
        corpus = load_from_disk(str(full))
        corpus.select(range(len(corpus) // 2)).flatten_indices().save_to_disk(str(half))
        print(f"corpus: N = {megabytes:g} MB ({len(corpus) // 2} documents), 2N = {2 * megabytes:g} MB "
              f"({len(corpus)} documents); num_proc={args.num_proc}, max_seq_len={args.max_seq_len}", flush=True)
        results = {}
        for size, path in (("N", half), ("2N", full)):
            for name in ("hydralm", "group_texts"):
                out = work / f"out-{name}-{size}"
                if name == "hydralm":
                    result = hydralm_run(path, out, args.num_proc, args.max_seq_len)
                else:
                    result = classic_run(path, out, args.num_proc, args.max_seq_len, tokenizer_dir)
                shutil.rmtree(out, ignore_errors=True)
                results[name, size] = result
                print(f"{name:>11} {size:>2}: {result['tokens']:>11,} tokens  end to end {result['total']:7.2f} s "
                      f"({result['tokens'] / result['total'] / 1e6:6.3f} M tok/s, {result['total_cpu']:7.2f} CPU s)  "
                      f"packing {result['pack']:7.3f} s ({result['tokens'] / result['pack'] / 1e6:8.2f} M tok/s)",
                      flush=True)
    total = "total" if args.clock == "wall" else "total_cpu"
    ours, theirs = results["hydralm", "2N"], results["group_texts", "2N"]
    print(f"ratio hydralm/group_texts: {theirs[total] / ours[total]:.2f}")
    print(f"ratio packing-only: {theirs['pack'] / ours['pack']:.2f}")
    print(f"scaling time(2N)/time(N): {ours[total] / results['hydralm', 'N'][total]:.2f}")


if __name__ == "__main__":
    main()
