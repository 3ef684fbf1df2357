"""`python -m ti_trainer demo`: the whole job on the built-in tiny model, in a few minutes on a CPU.

It draws a small image set, captions it, creates an embedding, trains it and leaves an A1111-style log
folder. The tiny model's weights are random, so its previews are noise: the demo shows the workflow and the
files, not a style.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from PIL import Image, ImageDraw

from ti_trainer.cli.terminal import train_in_terminal
from ti_trainer.config import TrainConfig
from ti_trainer.embeddings.create import create_embedding
from ti_trainer.fsutil import atomic_write, atomic_write_text

DEMO_NAME = "demo-style"
SHAPES = ("circle", "square", "triangle", "stripes")
COLOURS = {"red": (200, 40, 40), "blue": (40, 70, 200), "green": (40, 160, 70), "orange": (230, 140, 30)}


def draw_image(shape: str, colour: str, size: int, rng: random.Random) -> Image.Image:
    background = tuple(rng.randrange(180, 250) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    fill = COLOURS[colour]
    margin = rng.randrange(size // 8, size // 4)
    box = (margin, margin, size - margin, size - margin)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon(
            [(size // 2, margin), (margin, size - margin), (size - margin, size - margin)], fill=fill
        )
    else:
        for x in range(0, size, size // 8):
            draw.rectangle((x, 0, x + size // 16, size), fill=fill)
    return image


def make_dataset(folder: Path, count: int = 8, size: int = 128, seed: int = 0) -> Path:
    """Draw `count` images with captions describing what is incidental (shape, colour), as the seeds advise."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        shape, colour = (
            SHAPES[index % len(SHAPES)],
            list(COLOURS)[index % len(COLOURS) - index // len(COLOURS)],
        )
        image = draw_image(shape, colour, size, rng)
        stem = f"{index:02d}-{colour}-{shape}"
        atomic_write(folder / f"{stem}.png", lambda tmp, image=image: image.save(tmp, format="PNG"))
        atomic_write_text(folder / f"{stem}.txt", f"a {colour} {shape}, simple shapes")
    return folder


def run_demo(out: Path, steps: int = 50, model: str = "tiny") -> Path:
    """`model`: "tiny" (SD 2.x-like) or "tiny-sdxl" (SDXL-like: two text encoders, size conditioning)."""
    from ti_trainer.backends.loading import load_backend

    started = time.perf_counter()
    out = Path(out)
    data = make_dataset(out / "dataset")
    backend = load_backend(model, device="cpu")
    embeddings = out / "embeddings"
    path = create_embedding(backend, DEMO_NAME, "painting style", 2, embeddings, overwrite=True)
    print(f"Created {path} (2 vectors from 'painting style', {backend.family.title}-like tiny model)")
    config = TrainConfig(
        embedding_name=DEMO_NAME,
        data_dir=str(data),
        embeddings_dir=str(embeddings),
        log_dir=str(out / "textual_inversion"),
        template="filewords_name.txt",
        learn_rate="0.02:25, 0.005",
        batch_size=2,
        gradient_accumulation=2,
        max_steps=steps,
        width=128,
        height=128,
        save_every=10,
        # SDXL embeddings are saved as .safetensors (a .pt could hold the two tensors but not the step).
        save_format="safetensors" if backend.family.vectors_per_encoder else "pt",
        preview_every=25,
        preview_steps=10,
        shuffle_tags=True,
        seed=0,
        validate_every=5,  # a short run: evaluate often enough to draw a curve
    )
    result = train_in_terminal(config, lambda: backend)
    print(result.summary)
    print(f"\nLog folder: {result.log_folder}")
    for sub in ("embeddings", "images", "image_embeddings"):
        files = sorted(
            p.name for p in (result.log_folder / sub).glob("*") if p.suffix in (".pt", ".safetensors", ".png")
        )
        print(f"  {sub + '/':18} {', '.join(files)}")
    print(f"  {'':18} textual_inversion_loss.csv, settings-*.json")
    print(f"  {'':18} validation_loss.csv, embedding_norms.csv, image_report.csv, analysis.json")
    print(f"\nNext: python -m ti_trainer compare {result.log_folder}   (a grid of saved steps x prompts)")
    print(f"      python -m ti_trainer analyze {result.log_folder}   (suggested step, warnings, charts)")
    print(
        f"\nDone in {time.perf_counter() - started:.0f} s. The tiny model is random, so previews are noise."
    )
    return result.log_folder
