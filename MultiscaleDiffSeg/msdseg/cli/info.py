"""``msdseg info``: versions, device, model and label tree, as JSON (what a bug report needs)."""
from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None)


def run(args: argparse.Namespace) -> int:
    import torch

    import msdseg
    from msdseg.core.labels import load_tree
    from msdseg.model.devices import resolve_device
    from msdseg.model.modelfile import default_model_path, load_model

    tree = load_tree()
    loaded = load_model(args.model)
    info = {
        "msdseg": msdseg.__version__,
        "torch": torch.__version__,
        "device_auto": str(resolve_device("auto")),
        "model": str(loaded.path),
        "model_trained": loaded.trained,
        "model_parameters": sum(p.numel() for p in loaded.model.parameters()),
        "shipped_model": str(default_model_path()),
        "label_tree": f"{tree.name} {tree.version}: {len(tree.leaves)} leaves, {len(tree.internal)} internal nodes",
        "depths_mm": list(loaded.model.cfg.spacings_mm),
    }
    for key in ("metrics", "data", "train_steps", "train_cpu_seconds"):
        if key in loaded.config:
            info[key] = loaded.config[key]
    print(json.dumps(info, indent=1))
    return 0
