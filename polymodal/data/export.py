"""Write the shapes world in real data formats, so users see exactly what to bring for their data.

`export_world(format, out_dir, n)` renders scenes 0..n-1 of a `World` and writes:

- "llava": `llava.json` (LLaVA conversations, `"image": "images/<id>.png"`) + `images/`;
- "coco": `captions.json` (COCO captions, every caption template of a scene as one annotation,
  `file_name` relative to `images/` as in COCO) + `images/`;
- "webdataset": `shard-000000.tar`, ... with `<key>.png`, `<key>.txt` (the scene's short
  caption) and `<key>.json` (all captions, the conversation and the scene itself);
- "folder": `<shape>/<id>.png`, one folder per shape (every shape gets a folder, so class
  indices do not depend on n); scenes have exactly one object so the class is unambiguous.

Images are PNG, so the readers in `polymodal.data.formats` read back the exact pixels. Also
registers the CLI command `polymodal world export --format F --out DIR --n N`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

FORMATS = ("llava", "coco", "webdataset", "folder")


def export_world(
    format: str,
    out_dir: str | Path,
    n: int,
    split: str = "train",
    image_size: int = 64,
    seed: int = 0,
    num_objects: tuple[int, int] = (1, 3),
    shard_size: int = 100,
) -> str:
    """Write scenes 0..n-1 of `World(split, image_size, num_objects, seed=seed)` in `format`.

    `num_objects` is ignored for "folder" (always one object). Returns what to give the matching
    reader: the JSON file (llava, coco), the shard brace pattern (webdataset) or the class root
    (folder).
    """
    # The world and webdataset are imported here, not at module level, so `polymodal --help`
    # (which imports this module to register the command) stays instant.
    from polymodal.data.world import World

    if format not in FORMATS:
        raise ValueError(f"export_world: format {format!r} is not one of {FORMATS}")
    if n < 1:
        raise ValueError(f"export_world: n must be >= 1, got {n}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    objects = (1, 1) if format == "folder" else num_objects
    world = World(split, image_size=image_size, num_objects=objects, seed=seed)
    scenes = world.scenes(n)
    writer = {"llava": _write_llava, "coco": _write_coco, "webdataset": _write_webdataset, "folder": _write_folder}[
        format
    ]
    return writer(scenes, out, split, shard_size)


def scene_id(scene) -> str:
    """The id/key/file stem of a scene in every export: "<split>-<index:06d>"."""
    return f"{scene.split}-{scene.index:06d}"


def _write_llava(scenes, out: Path, split: str, shard_size: int) -> str:
    (out / "images").mkdir(exist_ok=True)
    records = []
    for scene in scenes:
        name = f"images/{scene_id(scene)}.png"
        scene.image().save(out / name)
        turns = [
            {"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in scene.conversation()
        ]
        records.append({"id": scene_id(scene), "image": name, "conversations": turns})
    path = out / "llava.json"
    path.write_text(json.dumps(records, indent=1))
    return str(path)


def _write_coco(scenes, out: Path, split: str, shard_size: int) -> str:
    (out / "images").mkdir(exist_ok=True)
    images, annotations = [], []
    for scene in scenes:
        name = f"{scene_id(scene)}.png"
        image = scene.image()
        image.save(out / "images" / name)
        images.append({"id": scene.index, "file_name": name, "width": image.width, "height": image.height})
        for caption in scene.captions():
            annotations.append({"id": len(annotations), "image_id": scene.index, "caption": caption})
    info = {"description": f"polymodal shapes world, split {split}", "version": "1.0"}
    path = out / "captions.json"
    path.write_text(json.dumps({"info": info, "images": images, "annotations": annotations}))
    return str(path)


def _write_webdataset(scenes, out: Path, split: str, shard_size: int) -> str:
    import io

    import webdataset as wds

    pattern = str(out / "shard-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0) as sink:
        for scene in scenes:
            buffer = io.BytesIO()
            scene.image().save(buffer, format="PNG")
            meta = {"captions": scene.captions(), "conversation": scene.conversation(), "scene": scene.to_dict()}
            sink.write(
                {"__key__": scene_id(scene), "png": buffer.getvalue(), "txt": scene.caption("short"), "json": meta}
            )
        last = sink.shard - 1
    return str(out / f"shard-{{000000..{last:06d}}}.tar")


def _write_folder(scenes, out: Path, split: str, shard_size: int) -> str:
    from polymodal.data.world import SHAPES

    for shape in SHAPES:
        (out / shape).mkdir(exist_ok=True)
    for scene in scenes:
        scene.image().save(out / scene.objects[0].shape / f"{scene_id(scene)}.png")
    return str(out)


def run_export(args: argparse.Namespace) -> None:
    """Handler of `polymodal world export`: export and print where the data went."""
    target = export_world(
        args.format, args.out, args.n, split=args.split, image_size=args.image_size, seed=args.seed,
        shard_size=args.shard_size,
    )  # fmt: skip
    print(f"wrote {args.n} {args.split} scenes as {args.format} to {args.out} (read it from {target})")


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register `world export` on the top-level `polymodal` subcommands."""
    world = subparsers.add_parser("world", help="the procedural shapes world")
    commands = world.add_subparsers(dest="world_command", required=True)
    p = commands.add_parser("export", help="write shapes-world scenes as LLaVA JSON, COCO, WebDataset or image folders")
    p.add_argument("--format", choices=FORMATS, required=True)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=1000, help="number of scenes")
    p.add_argument("--split", default="train", help="train, val, test or compositional")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=1000, help="samples per WebDataset shard")
    p.set_defaults(func=run_export)
