"""Console logging, the JSON-lines metrics log and TensorBoard, for rank 0 of a run."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import resource
import sys
import time
from pathlib import Path

import torch

from ptune.files import replacing, write_text_atomic


class LogFile(logging.FileHandler):
    """The run's log file. One it can no longer write (a full disk) is said once on the console and left off;
    logging's own handling printed a traceback for every line from then on."""

    def handleError(self, record: logging.LogRecord) -> None:
        reason = sys.exc_info()[1]
        logging.getLogger().removeHandler(self)
        with contextlib.suppress(OSError):
            self.close()
        logging.getLogger(__name__).warning("could not write %s (%s); the rest of this run's log is on the console "
                                            "only", self.baseFilename, getattr(reason, "strerror", None) or reason)


def setup_logging(log_file: Path | None = None, main_process: bool = True) -> None:
    """Plain console logging (warnings only on other ranks) plus an optional log file."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = logging.Formatter("[%(asctime)s %(levelname)s %(name)s] %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    root.addHandler(console)
    root.setLevel(logging.INFO if main_process else logging.WARNING)
    if log_file is not None and main_process:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = LogFile(log_file, encoding="utf-8")
        fh.setFormatter(fmt)
        root.addHandler(fh)
    for noisy in ("httpx", "urllib3", "datasets", "jieba"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def json_number(x: float) -> float | None:
    """Rounded for the log; None for inf/NaN, which strict JSON cannot hold (fp16 overflow steps have them)."""
    return round(x, 6) if math.isfinite(x) else None


class LogWindow:
    """What the training steps since the last log line add up to, and the line they make."""

    # What a checkpoint keeps of an open window, so that a resume logs the means an unbroken run would.
    KEPT = ("loss", "steps", "grad_norm", "norms")

    def __init__(self, kept: dict | None = None):
        self.loss, self.steps, self.grad_norm, self.norms, self.tokens = 0.0, 0, 0.0, 0, 0
        for key in self.KEPT:
            if kept and key in kept:
                setattr(self, key, kept[key])
        self.started = time.perf_counter()

    def add(self, loss: float, grad_norm: float, tokens: int) -> None:
        self.loss += loss
        # The mean of the finite norms only: an fp16 overflow step's inf (skipped_steps counts those) would
        # blank the whole mean.
        if math.isfinite(grad_norm):
            self.grad_norm += grad_norm
            self.norms += 1
        self.tokens += tokens
        self.steps += 1

    def pause(self, seconds: float) -> None:
        """Leave `seconds` (a save) out of tokens/s, which stays the rate of the training steps alone."""
        self.started += seconds

    def means(self) -> tuple[float, float]:
        """The mean loss and the mean finite gradient norm (NaN where no step had one)."""
        return self.loss / self.steps, self.grad_norm / self.norms if self.norms else math.nan

    def record(self, step: int, lr: float, skipped_steps: int, device: torch.device) -> dict:
        """The log line: means over the window, tokens/s since it opened, peak memory so far."""
        elapsed = time.perf_counter() - self.started
        loss, grad_norm = self.means()
        return {"step": step, "loss": json_number(loss), "lr": lr, "grad_norm": json_number(grad_norm),
                "tokens_per_s": round(self.tokens / elapsed, 1), "peak_mem_gib": round(peak_memory_gib(device), 3),
                "skipped_steps": skipped_steps}

    def kept(self) -> dict:
        return {key: getattr(self, key) for key in self.KEPT}


def read_log(path: Path) -> tuple[str, list[tuple[str, dict]]]:
    """The text of `train_log.jsonl`, and (line, record) for each of its lines that holds a JSON object. A kill or a
    full disk during an append leaves a torn last line, which is dropped with a warning instead of stopping a resume
    or a plot."""
    text = path.read_text(encoding="utf-8", errors="replace")
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append((line, record))
        else:
            logging.getLogger(__name__).warning("%s:%d: not a whole log record (cut off by an interrupted write?); "
                                                "dropped", path, number)
    return text, records


class MetricsLog:
    """Appends one JSON object per logged step to `train_log.jsonl` and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int = 0):
        self.path = run_dir / "train_log.jsonl"
        if self.path.exists():
            # Entries past the checkpoint we resume from were made by the interrupted run and will be
            # logged again; keep the file a single, consistent history.
            text, records = read_log(self.path)
            kept = "".join(line + "\n" for line, record in records if record.get("step", 0) <= resume_step)
            if kept != text:
                # Replaced whole: a kill during the rewrite must not lose the history it keeps.
                write_text_atomic(self.path, kept)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logging.getLogger(__name__).warning("tensorboard is not installed; logging to %s only", self.path)
            else:
                try:
                    self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)
                except OSError as e:
                    self._tensorboard_failed(e)

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self.writer is not None:
            try:
                for key, value in record.items():
                    if key != "step" and isinstance(value, (int, float)):
                        self.writer.add_scalar(f"train/{key}", value, record["step"])
            except OSError as e:  # its event file, not train_log.jsonl (written above): the run goes on without it
                self._tensorboard_failed(e)

    def _tensorboard_failed(self, error: OSError) -> None:
        """TensorBoard's folder or event file cannot be written (a full disk): that costs TensorBoard, not the run."""
        logging.getLogger(__name__).warning(
            "could not write TensorBoard events under %s (%s); train_log.jsonl goes on, TensorBoard stops here for "
            "this run", self.path.with_name("tensorboard"), error.strerror or error)
        writer, self.writer = self.writer, None
        if writer is not None:
            with contextlib.suppress(OSError):
                writer.close()

    def plot(self) -> None:
        """Redraw `train_loss.png` from the log so far (at every checkpoint, so a crashed run has one too).

        A plot that cannot be drawn or written costs a warning, never the run."""
        try:
            plot_loss(self.path, self.path.with_name("train_loss.png"))
        except (OSError, ValueError) as e:
            logging.getLogger(__name__).warning("could not draw %s: %s", self.path.with_name("train_loss.png"), e)

    def close(self) -> None:
        if self.writer is not None:
            try:  # its thread writes behind add_scalar: a full disk may show only now
                self.writer.close()
            except OSError as e:
                self.writer = None
                self._tensorboard_failed(e)
        self.plot()


def plot_loss(log_path: Path, png_path: Path) -> None:
    """Loss (and learning rate, on a second axis) against step from `train_log.jsonl`; nothing before the first
    logged step."""
    if not log_path.is_file():
        return
    records = [r for _, r in read_log(log_path)[1] if isinstance(r.get("loss"), (int, float))]  # NaN is logged as null
    if not records:
        return
    # Agg canvas on a bare Figure: no pyplot state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    steps = [r["step"] for r in records]
    ax.plot(steps, [r["loss"] for r in records], marker="." if len(records) < 60 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    if all("lr" in r for r in records):
        lr_ax = ax.twinx()
        lr_ax.plot(steps, [r["lr"] for r in records], color="tab:gray", linestyle="--")
        lr_ax.set_ylabel("learning rate")
    title, font_file = plot_title(log_path.parent.name)
    ax.set_title(title, parse_math=False)  # a run folder's name, not math between two $ signs
    if font_file is not None:  # the title's size, in a font that holds its characters
        ax.title.set_fontproperties(FontProperties(fname=font_file, size=ax.title.get_fontsize()))
    with replacing(png_path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


def plot_title(text: str) -> tuple[str, str | None]:
    """(title, font file or None for the configured font) that draw `text` without a missing-glyph warning.

    The configured font (DejaVu Sans by default) has no CJK glyphs, and a run folder may be named in Chinese: the
    title then takes an installed font holding its characters, and a character that no font holds is written as
    its escape (\\u8bad) instead of a box."""
    default = configured_font()
    if all(default.get_char_index(ord(c)) for c in text):
        return text, None
    path, held = font_holding(frozenset(text))
    return "".join(c if c in held else c.encode("unicode_escape").decode() for c in text), path


@functools.lru_cache(maxsize=8)  # one look per run name, not one per checkpoint
def font_holding(chars: frozenset[str]) -> tuple[str | None, frozenset[str]]:
    """(font file, the characters of `chars` it holds) of the installed font holding the most of them, or
    (None, those the configured font holds) when none holds more. Fonts installed after matplotlib cached its
    font list are looked at too: it only rescans when its version changes."""
    from matplotlib import font_manager, ft2font

    default = configured_font()
    best, best_held = None, frozenset(c for c in chars if default.get_char_index(ord(c)))
    # The file's first face: a font given by file, as the title's is, cannot name another.
    paths = dict.fromkeys([f.fname for f in font_manager.fontManager.ttflist] + font_manager.findSystemFonts())
    for path in paths:
        try:
            font = ft2font.FT2Font(path)
            name = font_manager.ttfFontProperty(font).name
        except (OSError, RuntimeError, ValueError):  # a broken font file is no reason to lose the plot
            continue
        if name.startswith("Last Resort"):  # every character a "missing" box: it would hide missing glyphs
            continue
        held = frozenset(c for c in chars if font.get_char_index(ord(c)))
        if len(held) > len(best_held):
            best, best_held = path, held
            if held == chars:
                break
    return best, best_held


def configured_font():
    """The font matplotlib draws text in unless told otherwise (rcParams' font.family)."""
    from matplotlib import font_manager

    return font_manager.get_font(font_manager.findfont(font_manager.FontProperties()))
