"""Tokens/s and peak memory of scratchlm's streaming data pipeline against the transformers-examples route.

Both routes turn the same ``.jsonl.gz`` file into MLM batches with the same tokenizer, and every
batch comes out of a real ``torch.utils.data.DataLoader``:

- ``scratchlm``: ``TextDataModule`` (read line by line, tokenize in the loader workers with batched
  ``tokenizers`` calls, pack into blocks, shuffle in a 64-block buffer) with ``MaskedLM.collate`` as
  the collate function (15% masking, 80/10/10), as ``scratchlm fit`` builds it, over one epoch.
- ``prepared``: the same, reading the corpus as ``scratchlm prepare`` wrote it (token ids,
  memory-mapped: no decoding or tokenizing in the loop). The preparing itself happens first, in
  the parent process, and gets a ``# prepare`` line of its own (tokens/s, seconds); once per
  corpus, it is not part of the route's time, as it is not part of a training run's.
- ``hf``: the route of transformers' ``examples/pytorch/language-modeling/run_mlm.py``:
  ``datasets.load_dataset("json", ...)``, ``.map(tokenize, batched=True, num_proc=W)`` (special
  tokens mask kept), ``.map(group_texts, batched=True, num_proc=W)`` (concatenate 1000 documents
  and cut into blocks, dropping each group's remainder), then a shuffled DataLoader with
  ``DataCollatorForLanguageModeling(mlm_probability=0.15)``. ``datasets`` gets a fresh cache
  folder inside a temporary folder for every run, so nothing is served from an earlier run's cache
  and nothing is written to ~/.cache.

``workers=W`` is the loader's ``num_workers`` for both routes, and also ``num_proc`` of the HF
maps (``None`` for 0). With W = 0 the ``tokenizers`` library may still use its own threads in
both routes, as it does for their users.

Each case runs in a fresh subprocess, so that its peak resident memory is its own. Printed, one
line per case::

    route=<r> workers=<W> tok_s=<tokens/s> peak_rss_mb=<MB> worker_peak_rss_mb=<MB> corpus=<k>x ...

- ``tok_s``: tokens in the batches delivered (every B·T position counts) over the wall time from
  building the pipeline (the HF route: from ``load_dataset``) to the last batch; imports excluded.
- ``peak_rss_mb``: the peak resident memory (VmHWM) of the process that builds the pipeline and
  consumes the batches; ``base_rss_mb`` is its resident memory just before (the imports).
- ``worker_peak_rss_mb``: the largest resident size seen in any child process (loader workers,
  ``datasets``' map processes), sampled every 0.2 s; 0 without any.
- ``tree_peak_pss_mb``: the largest total PSS of the process and all its children, sampled every
  0.2 s: the memory the whole route holds, pages shared after fork counted once.
- ``corpus=<k>x``: the benchmark corpus written k times into one file. Streaming memory must not
  grow with k.
- ``runs``: each 1x case runs ``--repeats`` times (fresh processes): the line shows the run with
  the median tok/s, and the largest memory peaks of all runs. Larger scales run once.

The benchmark corpus is ``--corpus`` (or, without it, the built-in corpus written to a temporary
.jsonl.gz), cut to its first documents that hold ``--max-tokens`` tokens (whole documents; 0 keeps
all): both routes read all of it, so ``--max-tokens`` bounds the run time of both alike.
"""

import argparse
import gzip
import itertools
import json
import os
from pathlib import Path
import platform
import subprocess
import sys
import tempfile
import threading
import time

ROUTES = ("scratchlm", "prepared", "hf")
"""The routes, in print order."""

TOKENIZER_SAMPLE_CHARS = 2_000_000
"""Characters of the corpus the benchmark's own tokenizer is trained on (when no --tokenizer)."""


# --- preparing the corpus and the tokenizer (in the parent process) -------------------------------


def write_jsonl_gz(path: Path, texts, copies: int = 1) -> None:
    """``texts`` as ``{"text": ...}`` lines, the whole list ``copies`` times over."""
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as f:
        for _ in range(copies):
            for text in texts:
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


def corpus_texts(corpus: str | None):
    """The documents' texts of ``--corpus`` (any path scratchlm reads), or of the built-in corpus."""
    from scratchlm.data import iter_documents, resolve_sources

    for document in iter_documents(resolve_sources([corpus] if corpus else None)):
        yield document.text


def train_benchmark_tokenizer(corpus: str | None, folder: Path) -> Path:
    """A BERT-style WordPiece tokenizer (8192 tokens) trained on the corpus's first documents."""
    from scratchlm.tokenizer import train_tokenizer

    sample, size = [], 0
    for text in corpus_texts(corpus):
        sample.append(text)
        size += len(text)
        if size >= TOKENIZER_SAMPLE_CHARS:
            break
    sample_file = folder / "tokenizer-sample.jsonl.gz"
    write_jsonl_gz(sample_file, sample)
    return train_tokenizer([str(sample_file)], folder / "tokenizer", family="bert")


def benchmark_texts(corpus: str | None, tokenizer_dir: Path, max_tokens: int) -> tuple[list[str], int]:
    """(the corpus's first documents holding ``max_tokens`` tokens, or all of them for 0; their
    token count, special tokens included)."""
    from scratchlm.tokenizer import TokenizerInfo

    tokenizer = TokenizerInfo.load(tokenizer_dir).tokenizer()
    texts, tokens = [], 0
    for text in corpus_texts(corpus):
        texts.append(text)
        tokens += len(tokenizer.encode(text).ids)
        if max_tokens and tokens >= max_tokens:
            break
    return texts, tokens


# --- measuring one case (in a child process) -----------------------------------------------------


def status_mb(pid: int | str, field: str) -> float:
    """A memory field of /proc/<pid>/status (VmHWM: peak resident, VmRSS: resident now) in MB;
    0 when the process is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def pss_mb(pid: int) -> float:
    """Proportional set size of ``pid`` in MB: pages shared by forked processes are split between
    them, so the PSS of a process tree adds up to the memory it really holds."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="utf-8") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def descendants(pid: int) -> list[int]:
    """Child processes of ``pid``, their children, and so on (from /proc/<pid>/task/*/children)."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        for task in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                children = [int(c) for c in task.read_text().split()]
            except OSError:
                continue
            found += children
            queue += children
    return found


class TreeMemory(threading.Thread):
    """Samples, every ``interval`` seconds, the memory of this process and all its descendants
    (loader workers, ``datasets``' map processes): the largest resident size of any one descendant,
    and the largest PSS sum of the whole tree."""

    def __init__(self, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.worker_peak_mb = 0.0
        self.tree_peak_mb = 0.0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        me = os.getpid()
        others = descendants(me)
        self.worker_peak_mb = max([self.worker_peak_mb] + [status_mb(pid, "VmRSS") for pid in others])
        self.tree_peak_mb = max(self.tree_peak_mb, sum(pss_mb(pid) for pid in [me, *others]))

    def stop(self) -> None:
        self.sample()
        self._stop_event.set()
        self.join()


def consume(loader) -> int:
    """Tokens of all the batches ``loader`` delivers (one pass); its workers have exited after."""
    tokens = 0
    for batch in loader:
        tokens += batch["input_ids"].numel()
    return tokens


def scratchlm_loader(file: str, tokenizer_dir: str, workers: int, block_size: int, batch_size: int):
    from scratchlm.data import TextDataModule
    from scratchlm.objectives.mlm import MaskedLM
    from scratchlm.tokenizer import TokenizerInfo

    data = TextDataModule(
        paths=[file], tokenizer=tokenizer_dir, val_fraction=0.0, block_size=block_size,
        batch_size=batch_size, num_workers=workers, train_epochs=1,
    )
    data.collate_fn = MaskedLM(TokenizerInfo.load(tokenizer_dir)).collate
    return data.train_dataloader()


def hf_loader(file: str, tokenizer_dir: str, workers: int, block_size: int, batch_size: int, cache: str):
    """The run_mlm.py route (written here from its description, not copied)."""
    import datasets
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling

    num_proc = workers or None
    raw = datasets.load_dataset("json", data_files=file, split="train", cache_dir=cache)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    def tokenize(examples):
        return tokenizer(examples["text"], return_special_tokens_mask=True)

    def group_texts(examples):
        joined = {key: list(itertools.chain.from_iterable(examples[key])) for key in examples}
        usable = len(joined["input_ids"]) // block_size * block_size
        return {key: [ids[i : i + block_size] for i in range(0, usable, block_size)] for key, ids in joined.items()}

    tokenized = raw.map(tokenize, batched=True, num_proc=num_proc, remove_columns=raw.column_names)
    blocks = tokenized.map(group_texts, batched=True, num_proc=num_proc)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    return DataLoader(blocks, batch_size=batch_size, shuffle=True, collate_fn=collator, num_workers=workers)


def prepared_folder(file: Path) -> Path:
    return file.with_name(file.name.split(".")[0] + "-prepared")


def prepare_line(file: Path, tokenizer: Path, scale: int) -> str:
    """Prepare ``file`` into ``prepared_folder(file)``, timed."""
    from scratchlm.data.prepared import prepare_corpus

    start = time.perf_counter()
    metadata = prepare_corpus([str(file)], tokenizer, prepared_folder(file))
    seconds = time.perf_counter() - start
    return (
        f"# prepare corpus={scale}x tokens={metadata['tokens']} seconds={seconds:.2f} "
        f"tok_s={metadata['tokens'] / seconds:.0f} (document tokens, before packing) load={load_average()}"
    )


def run_case(spec: dict) -> dict:
    """Build one route's loader, drain it, and measure; ``spec`` as ``measure`` makes it."""
    cache = spec["cache"]
    os.environ["HF_HOME"] = os.path.join(cache, "hf-home")
    os.environ["HF_DATASETS_CACHE"] = os.path.join(cache, "datasets")
    # Every import either route needs, before the clock starts (lightning alone takes seconds).
    import datasets
    import torch  # noqa: F401
    import transformers
    import scratchlm.data.module  # noqa: F401  (TextDataModule, which brings lightning)
    import scratchlm.objectives.mlm  # noqa: F401

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()  # "sequence longer than model_max_length" per long document
    base = status_mb("self", "VmRSS")
    tree = TreeMemory()
    tree.start()
    start = time.perf_counter()
    args = (spec["file"], spec["tokenizer"], spec["workers"], spec["block_size"], spec["batch_size"])
    if spec["route"] in ("scratchlm", "prepared"):
        loader = scratchlm_loader(*args)
    else:
        loader = hf_loader(*args, cache=os.environ["HF_DATASETS_CACHE"])
    tokens = consume(loader)
    seconds = time.perf_counter() - start
    tree.stop()
    return dict(
        tokens=tokens, seconds=seconds, base_rss_mb=base, peak_rss_mb=status_mb("self", "VmHWM"),
        worker_peak_rss_mb=tree.worker_peak_mb, tree_peak_pss_mb=tree.tree_peak_mb,
    )


def measure(route: str, workers: int, scale: int, file: Path, args, tmp: Path) -> dict:
    """Run one case in a fresh Python process and return its measurements."""
    cache = tempfile.mkdtemp(prefix=f"hf-cache-{route}-{workers}-{scale}x-", dir=tmp)
    spec = dict(
        route=route, workers=workers, file=str(prepared_folder(file) if route == "prepared" else file), tokenizer=str(args.tokenizer), block_size=args.block_size,
        batch_size=args.batch_size, cache=cache,
    )
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
        capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"route={route} workers={workers} corpus={scale}x failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def repeated(route: str, workers: int, scale: int, file: Path, args, tmp: Path) -> dict:
    """``measure`` ``args.repeats`` times at 1x (once at larger scales): the median tok/s and
    seconds, the largest memory peaks."""
    runs = [measure(route, workers, scale, file, args, tmp) for _ in range(args.repeats if scale == 1 else 1)]
    runs.sort(key=lambda r: r["tokens"] / r["seconds"])
    result = dict(runs[len(runs) // 2], runs=len(runs))
    for key in ("peak_rss_mb", "worker_peak_rss_mb", "tree_peak_pss_mb"):
        result[key] = max(r[key] for r in runs)
    return result


def case_line(route: str, workers: int, scale: int, result: dict) -> str:
    return (
        f"route={route} workers={workers} tok_s={result['tokens'] / result['seconds']:.0f} "
        f"peak_rss_mb={result['peak_rss_mb']:.0f} worker_peak_rss_mb={result['worker_peak_rss_mb']:.0f} "
        f"tree_peak_pss_mb={result['tree_peak_pss_mb']:.0f} "
        f"corpus={scale}x tokens={result['tokens']} seconds={result['seconds']:.2f} "
        f"base_rss_mb={result['base_rss_mb']:.0f} runs={result['runs']} load={load_average()}"
    )


# --- command line --------------------------------------------------------------------------------


def load_average() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give non-negative integers, comma-separated")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", help="text to read (any path scratchlm reads); default: the built-in corpus")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder with a mask token; default: train one")
    parser.add_argument("--block-size", type=int, default=128, help="tokens per block (default 128)")
    parser.add_argument("--batch-size", type=int, default=32, help="blocks per batch (default 32)")
    parser.add_argument("--max-tokens", type=int, default=2_000_000,
                        help="keep the corpus's first documents holding this many tokens; 0: all (default 2M)")
    parser.add_argument("--workers", type=int_list, default=[0, 1, 2], help="loader workers to run (default 0,1,2)")
    parser.add_argument("--scales", type=int_list, default=[1, 10],
                        help="corpus copies to measure memory on (default 1,10); scales above 1 run with "
                             "the largest --workers value only")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each 1x case, reporting the median tok/s (default 3; larger scales run once)")
    parser.add_argument("--route", action="append", choices=ROUTES, help="route(s) to run (default both)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.route = [r for r in ROUTES if r in (args.route or ROUTES)]
    if min(args.block_size, args.batch_size, args.repeats) < 1:
        parser.error("--block-size, --batch-size and --repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_case(json.loads(args.child))), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="scratchlm-data-bench-") as tmp_name:
        tmp = Path(tmp_name)
        args.tokenizer = args.tokenizer or train_benchmark_tokenizer(args.corpus, tmp)
        texts, tokens = benchmark_texts(args.corpus, args.tokenizer, args.max_tokens)
        files = {}
        for scale in sorted(set(args.scales) | {1}):
            files[scale] = tmp / f"corpus-{scale}x.jsonl.gz"
            write_jsonl_gz(files[scale], texts, copies=scale)
        import tokenizers
        import torch
        import transformers
        import datasets

        print(
            f"# cpu={cpu_model()!r} cores={len(os.sched_getaffinity(0))} torch={torch.__version__} "
            f"transformers={transformers.__version__} tokenizers={tokenizers.__version__} "
            f"datasets={datasets.__version__}\n"
            f"# corpus={args.corpus or 'built-in'} documents={len(texts)} tokens={tokens} (1x; first documents "
            f"up to --max-tokens={args.max_tokens}) block_size={args.block_size} batch_size={args.batch_size} "
            f"tokenizer={args.tokenizer if args.tokenizer.parent != tmp else 'WordPiece 8192, trained on the corpus'}",
            flush=True,
        )
        if "prepared" in args.route:
            for scale in sorted(set(args.scales)):
                print(prepare_line(files[scale], args.tokenizer, scale), flush=True)
        for scale in sorted(set(args.scales)):
            workers = args.workers if scale == 1 else [max(args.workers)]
            for route in args.route:
                for w in workers:
                    result = repeated(route, w, scale, files[scale], args, tmp)
                    print(case_line(route, w, scale, result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
