"""Bad adapters for the corpus: a different base, truncated, tampered or pickled weights, tensors that do not fit,
missing or invalid configs, folders that are not adapters, damaged PEFT and full fine-tuning outputs, pickle-format
weights beside an unrelated safetensors file for every loader, and configs or tensors that would load into a
silently wrong model.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import struct
import sys
from pathlib import Path

from corpus_cases import HERE, OUT, REL, case


def gen_adapters() -> None:
    sys.path.insert(0, str(HERE.parent))
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    from loramoe import LoRAMoEConfig, inject
    from loramoe.adapter import save_adapter
    from loramoe.files import sha256_file
    from loramoe.inject import adapter_parameters

    from tiny import tiny_model

    root = OUT / "adapters"
    torch.manual_seed(0)
    model = inject(tiny_model("llama"), LoRAMoEConfig(num_experts=2, rank=2))
    generator = torch.Generator().manual_seed(0)  # weights independent of the library's initialisation
    with torch.no_grad():
        for param in adapter_parameters(model).values():
            param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    good = root / "good"
    save_adapter(model, good, base_name_or_path="base")
    weights, config = good / "adapter_model.safetensors", good / "adapter_config.json"
    meta = json.loads(config.read_text())
    # safetensors writes several metadata keys in hash order; one key keeps the corpus's bytes reproducible
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt"})
    meta["weights_sha256"] = sha256_file(weights)
    config.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    def variant(name: str, error: str, match: str, *, model: str | None = None) -> Path:
        folder = root / name
        shutil.copytree(good, folder)
        extra = {"model": model} if model else {}
        case(f"adapter/{name}", error, match, adapter=f"{REL}/adapters/{name}", **extra)
        return folder

    def rewrite_meta(folder: Path, change) -> None:
        m = copy.deepcopy(meta)
        change(m)
        (folder / "adapter_config.json").write_text(json.dumps(m, indent=2))

    variant("different-base", "AdapterError", r"different base model.*intermediate_size", model="other")
    f = variant("different-base-recorded", "AdapterError", r"different base model.*hidden_size")
    rewrite_meta(f, lambda m: m["base_model"].update(hidden_size=4096))
    size = weights.stat().st_size
    for name, keep in {"truncated-half": size // 2, "truncated-header": 6, "truncated-one-byte": size - 1,
                       "empty-weights": 0}.items():  # fmt: skip
        f = variant(name, "AdapterError", r"adapter_model\.safetensors.*(checksum|truncated)")
        (f / "adapter_model.safetensors").write_bytes(weights.read_bytes()[:keep])
    for name, keep in {"truncated-no-checksum": size // 2, "empty-no-checksum": 0}.items():
        f = variant(name, "AdapterError", r"adapter_config\.json field 'weights_sha256': missing")
        (f / "adapter_model.safetensors").write_bytes(weights.read_bytes()[:keep])
        rewrite_meta(f, lambda m: m.pop("weights_sha256"))
    data = bytearray(weights.read_bytes())
    for name, offset in {"tampered-last-byte": len(data) - 1, "tampered-header-byte": 20}.items():
        f = variant(name, "AdapterError", r"checksum does not match")
        changed = bytearray(data)
        changed[offset] ^= 0x01
        (f / "adapter_model.safetensors").write_bytes(bytes(changed))
    f = variant("garbage-header", "AdapterError", r"not a readable safetensors")
    (f / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{" * 64)
    rewrite_meta(f, lambda m: m.update(weights_sha256=sha256_file(f / "adapter_model.safetensors")))
    # tensors that do not fit, with a matching checksum (a foreign or edited file, not a torn one)
    state = load_file(str(weights))
    edits = {
        "missing-tensor": lambda s: s.pop(sorted(s)[0]),
        "extra-tensor": lambda s: s.update({"model.layers.9.mlp.up_proj.lora_A": torch.zeros(2, 2, 32)}),
        "wrong-shape": lambda s: s.update({sorted(s)[0]: torch.zeros(3, 3)}),
    }
    for name, edit in edits.items():
        f = variant(name, "AdapterError", r"does not fit this model")
        s = dict(state)
        edit(s)
        save_file(s, str(f / "adapter_model.safetensors"), metadata={"format": "pt"})
        rewrite_meta(f, lambda m, f=f: m.update(weights_sha256=sha256_file(f / "adapter_model.safetensors")))
    # pickle files are refused (never unpickled: these would run code if they were)
    for name in ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin"):
        f = variant(
            f"pickle-{name.replace('.', '-')}", "AdapterError", rf"{re.escape(name)}.*refusing.*pickle"
        )
        (f / "adapter_model.safetensors").unlink()
        (f / name).write_bytes(b"\x80\x04cposix\nsystem\nX\x0b\x00\x00\x00echo pwned\x85R.")
    f = variant("pickle-without-config", "AdapterError", r"adapter_model\.bin.*refusing.*pickle")
    (f / "adapter_model.safetensors").unlink()
    (f / "adapter_config.json").unlink()
    (f / "adapter_model.bin").write_bytes(b"\x80\x04N.")
    # the config
    f = variant("missing-config", "AdapterError", r"adapter_config\.json.*missing")
    (f / "adapter_config.json").unlink()
    f = variant("missing-weights", "AdapterError", r"adapter_model\.safetensors.*missing")
    (f / "adapter_model.safetensors").unlink()
    bad_configs = {
        "config-not-json": b"format: loramoe\n",
        "config-truncated-json": config.read_bytes()[:40],
        "config-empty": b"",
        "config-latin1": '{"format": "loramoe", "note": "é"}'.encode("latin-1"),
        "config-utf16": config.read_text().encode("utf-16"),
        "config-nan-garbage": b"NaNaN",
    }
    for name, content in bad_configs.items():
        f = variant(name, "AdapterError", r"adapter_config\.json.*not valid JSON")
        (f / "adapter_config.json").write_bytes(content)
    foreign = {
        "config-is-list": [meta],
        "config-wrong-format": {**meta, "format": "peft"},
        "config-no-format": {k: v for k, v in meta.items() if k != "format"},
        "config-config-not-object": {**meta, "config": "num_experts=2"},
    }
    for name, doc in foreign.items():
        f = variant(name, "AdapterError", r"adapter_config\.json.*not a loramoe adapter config")
        (f / "adapter_config.json").write_text(json.dumps(doc))
    invalid = {
        "config-invalid-experts": {"num_experts": 0},
        "config-invalid-odd-binary": {"num_experts": 3},
        "config-invalid-dropout": {"dropout": 2},
        "config-unknown-key": {"experts": 2},
        "config-task-names-number": {"task_names": 3},
        "config-task-names-nested": {"task_names": [["a"], ["b"]]},
    }
    for name, change in invalid.items():
        f = variant(name, "AdapterError", r"adapter_config\.json field 'config'")
        rewrite_meta(f, lambda m, change=change: m["config"].update(change))
    f = variant("config-base-model-not-object", "AdapterError", r"adapter_config\.json field 'base_model'")
    rewrite_meta(f, lambda m: m.update(base_model="llama"))
    f = variant("config-no-base-name", "AdapterError", r"does not name its base model")
    rewrite_meta(f, lambda m: m["base_model"].update(name_or_path=None))
    f = variant("config-base-not-found", "ConfigError", r"base model 'corpus/no_such_base'.*pass --model")
    rewrite_meta(f, lambda m: m["base_model"].update(name_or_path="corpus/no_such_base"))

    # folders that are not adapters
    (root / "empty-dir").mkdir()
    (root / "empty-dir" / ".keep").write_text("")
    case(
        "adapter/empty-dir",
        "AdapterError",
        r"empty-dir.*neither an adapter",
        adapter=f"{REL}/adapters/empty-dir",
    )
    case(
        "adapter/not-found",
        "AdapterError",
        r"no_such_adapter.*not found",
        adapter=f"{REL}/adapters/no_such_adapter",
    )
    case("adapter/is-a-file", "AdapterError", r"good/adapter_config\.json.*not found",
         adapter=f"{REL}/adapters/good/adapter_config.json")  # fmt: skip

    # the LoRA baseline (PEFT) and full fine-tuning outputs
    torch.manual_seed(0)
    base = tiny_model("llama")
    base.name_or_path = base.config._name_or_path = "base"
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["up_proj"], task_type="CAUSAL_LM"))
    peft_good = root / "peft-good"
    peft_model.save_pretrained(str(peft_good))
    (peft_good / "README.md").unlink(missing_ok=True)
    pmeta = json.loads((peft_good / "adapter_config.json").read_text())
    pmeta["base_model_name_or_path"] = "base"
    (peft_good / "adapter_config.json").write_text(json.dumps(pmeta, indent=2))

    def peft_variant(name: str, error: str, match: str) -> Path:
        folder = root / name
        shutil.copytree(peft_good, folder)
        case(f"adapter/{name}", error, match, adapter=f"{REL}/adapters/{name}")
        return folder

    f = peft_variant("peft-pickle-only", "AdapterError", r"adapter_model\.bin.*refusing.*pickle")
    (f / "adapter_model.safetensors").unlink()
    (f / "adapter_model.bin").write_bytes(b"\x80\x04N.")
    f = peft_variant("peft-truncated", "AdapterError", r"peft-truncated.*cannot load")
    p = f / "adapter_model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    f = peft_variant("peft-no-base-name", "AdapterError", r"does not name its base model")
    (f / "adapter_config.json").write_text(json.dumps({**pmeta, "base_model_name_or_path": None}))
    f = peft_variant("peft-bad-rank", "AdapterError", r"peft-bad-rank.*cannot load")
    (f / "adapter_config.json").write_text(json.dumps({**pmeta, "r": "two"}))

    full = root / "full-truncated"
    tiny_model("llama").save_pretrained(str(full))
    p = full / "model.safetensors"
    p.write_bytes(p.read_bytes()[:4096])
    case(
        "adapter/full-truncated",
        "AdapterError",
        r"full-truncated.*cannot load",
        adapter=f"{REL}/adapters/full-truncated",
    )
    full_pickle = root / "full-pickle-only"
    full_pickle.mkdir()
    shutil.copy(full / "config.json", full_pickle / "config.json")
    (full_pickle / "pytorch_model.bin").write_bytes(b"\x80\x04N.")
    case("adapter/full-pickle-only", "AdapterError", r"pytorch_model\.bin.*refusing.*pickle",
         adapter=f"{REL}/adapters/full-pickle-only")  # fmt: skip
    full_bad_config = root / "full-bad-config"
    full_bad_config.mkdir()
    (full_bad_config / "config.json").write_text('{"model_type": "llama", ')
    shutil.copy(full / "model.safetensors", full_bad_config / "model.safetensors")
    case("adapter/full-bad-config", "AdapterError", r"full-bad-config.*cannot load",
         adapter=f"{REL}/adapters/full-bad-config")  # fmt: skip
    # a config.json transformers would read wrongly (the last of two keys) or fail on with a Python message
    for name, edit, match in [
        ("full-config-key-twice", lambda t: t.replace('"vocab_size": 320', '"vocab_size": 320, "vocab_size": 999'),
         r"config\.json field 'vocab_size': the key is given twice"),
        ("full-config-long-integer", lambda t: t.replace('"vocab_size": 320', '"vocab_size": ' + "3" * 5000),
         r"config\.json field 'vocab_size': an integer of 5000 digits"),
    ]:  # fmt: skip
        tiny_model("llama").save_pretrained(str(root / name))
        (root / name / "config.json").write_text(edit((root / name / "config.json").read_text()))
        case(f"adapter/{name}", "AdapterError", rf"{name}.*{match}", adapter=f"{REL}/adapters/{name}")

    # --- class: pickle-format weights anywhere a loader reads weights, whatever else is beside them -----------
    evil = b"\x80\x04cposix\nsystem\nX\x0b\x00\x00\x00echo pwned\x85R."
    # a safetensors file the loader never reads
    decoy = {"unrelated.safetensors": good / "adapter_model.safetensors"}
    for name in ("adapter_model.bin", "pytorch_model.bin", "adapter_model-00001-of-00002.bin"):
        f = variant(f"pickle-beside-safetensors-{name.split('.')[0]}", "AdapterError",
                    rf"{re.escape(name)}.*refusing.*pickle")  # fmt: skip
        (f / "adapter_model.safetensors").unlink()
        shutil.copy(decoy["unrelated.safetensors"], f / "unrelated.safetensors")
        (f / name).write_bytes(evil)
    f = peft_variant(
        "peft-pickle-beside-safetensors", "AdapterError", r"adapter_model\.bin.*refusing.*pickle"
    )
    (f / "adapter_model.safetensors").rename(f / "unrelated.safetensors")
    (f / "adapter_model.bin").write_bytes(evil)
    fine = root / "full-good"
    tiny_model("llama").save_pretrained(str(fine))
    for name, files in {
        "full-pickle-beside-safetensors": ["pytorch_model.bin"],
        "full-sharded-pickle": ["pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json"],
    }.items():
        f = root / name
        f.mkdir()
        shutil.copy(fine / "config.json", f / "config.json")
        shutil.copy(fine / "model.safetensors", f / "unrelated.safetensors")
        for file in files:
            (f / file).write_bytes(evil if file.endswith(".bin") else b'{"weight_map": {}}')
        case(f"adapter/{name}", "AdapterError", rf"{re.escape(sorted(files)[0])}.*refusing.*pickle",
             adapter=f"{REL}/adapters/{name}")  # fmt: skip
    shutil.rmtree(fine)
    f = variant(
        "base-is-pickle", "ConfigError", r"base model.*full-pickle-beside-safetensors.*refusing.*pickle"
    )
    rewrite_meta(
        f, lambda m: m["base_model"].update(name_or_path=f"{REL}/adapters/full-pickle-beside-safetensors")
    )

    # --- class: an adapter config or tensor that would load into a silently wrong model ------------------------
    for field in meta["config"]:
        f = variant(
            f"config-missing-{field}",
            "AdapterError",
            rf"adapter_config\.json field 'config\.{field}': missing",
        )
        rewrite_meta(f, lambda m, field=field: m["config"].pop(field))
    for key in ("model_type", "hidden_size", "name_or_path"):
        f = variant(f"config-missing-base-{key}", "AdapterError",
                    rf"adapter_config\.json field 'base_model\.{key}': missing")  # fmt: skip
        rewrite_meta(f, lambda m, key=key: m["base_model"].pop(key))
    f = variant("config-future-format", "AdapterError", r"adapter_config\.json field 'format_version'")
    rewrite_meta(f, lambda m: m.update(format_version=99))
    f = variant(
        "config-format-version-true", "AdapterError", r"adapter_config\.json field 'format_version': True"
    )
    rewrite_meta(f, lambda m: m.update(format_version=True))
    f = variant(
        "config-duplicate-key", "AdapterError", r"adapter_config\.json field 'alpha': the key is given twice"
    )
    (f / "adapter_config.json").write_text(
        json.dumps(meta).replace('"alpha": 32.0', '"alpha": 32.0, "alpha": 8.0')
    )
    f = variant(
        "config-long-integer",
        "AdapterError",
        r"adapter_config\.json field 'config\.rank': an integer of 5000",
    )
    (f / "adapter_config.json").write_text(json.dumps({**meta, "config": {**meta["config"], "rank": 0}})
                                           .replace('"rank": 0', '"rank": ' + "1" * 5000))  # fmt: skip
    f = variant("config-checksum-not-hex", "AdapterError", r"field 'weights_sha256': must be a SHA-256")
    rewrite_meta(f, lambda m: m.update(weights_sha256="abc"))
    f = variant("config-nan-alpha", "AdapterError", r"adapter_config\.json.*not valid JSON.*NaN")
    (f / "adapter_config.json").write_text(json.dumps(meta).replace('"alpha": 32.0', '"alpha": NaN'))
    first = sorted(state)[0]
    tensors = {
        "tensor-int64": state[first].to(torch.int64),
        "tensor-int8": state[first].to(torch.int8),
        "tensor-bool": state[first] > 0,
        "tensor-nan": state[first].clone().fill_(float("nan")),
        "tensor-inf": torch.full_like(state[first], float("inf")),
    }
    for name, tensor in tensors.items():
        what = "floating-point tensor expected" if not tensor.is_floating_point() else "NaN or infinite"
        f = variant(name, "AdapterError", rf"does not fit this model.*{re.escape(first)}: .*{what}")
        save_file({**state, first: tensor}, str(f / "adapter_model.safetensors"), metadata={"format": "pt"})
        rewrite_meta(f, lambda m, f=f: m.update(weights_sha256=sha256_file(f / "adapter_model.safetensors")))
    f = variant("config-a-million-experts", "AdapterError", r"config.*num_experts=1000000.*more than 10x")
    rewrite_meta(f, lambda m: m["config"].update(num_experts=1_000_000))
