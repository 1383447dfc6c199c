"""Write the shapes world in real data formats, so users see exactly what to bring for their data.

`export_world(format, out_dir, n)` renders scenes 0..n-1 of a `World` split (train by default)
and writes:

- "llava": `llava.json` (LLaVA conversations, `"image": "images/<id>.png"`) + `images/`;
- "coco": `captions.json` (COCO captions, every caption template of a scene as one annotation,
  `file_name` relative to `images/` as in COCO) + `images/`;
- "webdataset": `shard-000000.tar`, ... with `<key>.png`, `<key>.txt` (the scene's short
  caption) and `<key>.json` (all captions, the conversation and the scene itself);
- "folder": `<shape>/<id>.png`, a folder only for the shapes that occur (scenes have exactly
  one object so the class is unambiguous), plus `classes.txt` listing every shape, so class
  indices do not depend on n.

Images are PNG, so the readers in `polymodal.data.formats` read back the exact pixels.

The output folder is claimed through `polymodal.outputs`: a folder holding anything else is
refused unless `overwrite`, an earlier export there is replaced whole (no stale shards of a
larger export survive), and a file polymodal did not write is never written over. Every file
name is claimed before the first one is written, and JSON files are written atomically.

Also registers the CLI command `polymodal world export --format F --out DIR --n N [--overwrite]`.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path

from polymodal.atomic import write_text_atomic
from polymodal.errors import DestinationExistsError, UsageError
from polymodal.outputs import Manifest, claim_folder

FORMATS = ("llava", "coco", "webdataset", "folder")
WRITER = "world export"
MAX_IMAGE_SIZE = 1024  # a 1024 x 1024 PNG per scene is already far beyond what the world needs


def export_world(
    format: str,
    out_dir: str | Path,
    n: int,
    split: str = "train",
    image_size: int = 64,
    seed: int = 0,
    num_objects: tuple[int, int] = (1, 3),
    shard_size: int = 100,
    overwrite: bool = False,
) -> str:
    """Write scenes 0..n-1 of `World(split, image_size, num_objects, seed=seed)` in `format`.

    `num_objects` is ignored for "folder" (always one object). Arguments are checked before any
    file is touched. Returns what to give the matching reader: the JSON file (llava, coco), the
    shard brace pattern (webdataset) or the class root (folder).

    Raises:
        UsageError: naming the first bad argument (e.g. "--n must be >= 1, got 0").
        DestinationExistsError: `out_dir` holds files polymodal did not write (or an earlier
            export) and `overwrite` is false, or an output name is taken by such a file.
    """
    # The world is imported here, not at module level, so `polymodal --help` (which imports this
    # module to register the command) stays instant.
    from polymodal.data.world import World

    check_export_arguments(format, n, split, image_size, shard_size, seed)
    objects = (1, 1) if format == "folder" else num_objects
    try:
        world = World(split, image_size=image_size, num_objects=objects, seed=seed)
    except ValueError as err:
        raise UsageError(f"world export: {err}") from err
    manifest = claim_folder(out_dir, WRITER, overwrite)
    scenes = list(world.scenes(n))  # objects only; each image is rendered when it is written
    writer = {"llava": _write_llava, "coco": _write_coco, "webdataset": _write_webdataset, "folder": _write_folder}
    target = writer[format](scenes, manifest, split, shard_size)
    manifest.save()
    return target


def check_export_arguments(format: str, n: int, split: str, image_size: int, shard_size: int, seed: int) -> None:
    """Raise `UsageError` naming the first bad argument (by its command-line flag)."""
    from polymodal.data.world import SPLITS
    from polymodal.data.world.render import MIN_IMAGE_SIZE

    if format not in FORMATS:
        raise UsageError(f"--format {format!r} is not one of {FORMATS}")
    for flag, value, low in (("--n", n, 1), ("--shard-size", shard_size, 1), ("--seed", seed, 0)):
        if not _is_int(value):
            raise UsageError(f"{flag} must be an integer, got {value!r}")
        if value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    if not _is_int(image_size) or not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise UsageError(f"--image-size must be an integer in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {image_size!r}")
    if split not in SPLITS:
        raise UsageError(f"--split {split!r} is not one of {SPLITS}")


def _is_int(value: object) -> bool:
    """True for a genuine integer (bool is an int to Python, but `--n True` is a mistake)."""
    return isinstance(value, int) and not isinstance(value, bool)


def scene_id(scene) -> str:
    """The id/key/file stem of a scene in every export: "<split>-<index:06d>"."""
    return f"{scene.split}-{scene.index:06d}"


def _claim_all(manifest: Manifest, names: list[str]) -> dict[str, Path]:
    """Claim every output name before anything is written, then save the manifest.

    Checking every name first means a name taken by a foreign file stops the export before any
    work (not even a folder is made); saving the manifest now means an export that dies half-way
    is still recognised (and replaceable with overwrite) as polymodal's own output.
    """
    root = manifest.folder.resolve()
    for name in names:
        path = manifest.folder / name
        # A foreign symlinked folder (e.g. `images -> /elsewhere`) would carry the write outside.
        if not path.resolve().is_relative_to(root):
            raise DestinationExistsError(f"{path} leads outside {manifest.folder} (a symlink?); "
                                         "move it away or choose another output folder")
        # A foreign file where the name or one of its folders goes: refused in the manifest's words.
        for folder in reversed(Path(name).parents[:-1]):
            if (manifest.folder / folder).is_symlink() or (manifest.folder / folder).is_file():
                manifest.claim(folder)
        if path.exists() or path.is_symlink():
            manifest.claim(name)
    paths = {name: manifest.claim(name) for name in names}
    manifest.save()
    return paths


def _write_llava(scenes, manifest: Manifest, split: str, shard_size: int) -> str:
    """images/<id>.png + llava.json; returns the JSON path."""
    names = {scene_id(s): f"images/{scene_id(s)}.png" for s in scenes}
    paths = _claim_all(manifest, [*names.values(), "llava.json"])
    records = []
    for scene in scenes:
        name = names[scene_id(scene)]
        scene.image().save(paths[name])
        turns = [
            {"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in scene.conversation()
        ]
        records.append({"id": scene_id(scene), "image": name, "conversations": turns})
    write_text_atomic(paths["llava.json"], json.dumps(records, indent=1))
    return str(paths["llava.json"])


def _write_coco(scenes, manifest: Manifest, split: str, shard_size: int) -> str:
    """images/<id>.png + captions.json; returns the JSON path."""
    paths = _claim_all(manifest, [*(f"images/{scene_id(s)}.png" for s in scenes), "captions.json"])
    images, annotations = [], []
    for scene in scenes:
        name = f"{scene_id(scene)}.png"
        image = scene.image()
        image.save(paths[f"images/{name}"])
        images.append({"id": scene.index, "file_name": name, "width": image.width, "height": image.height})
        for caption in scene.captions():
            annotations.append({"id": len(annotations), "image_id": scene.index, "caption": caption})
    info = {"description": f"polymodal shapes world, split {split}", "version": "1.0"}
    write_text_atomic(paths["captions.json"], json.dumps({"info": info, "images": images, "annotations": annotations}))
    return str(paths["captions.json"])


def _write_webdataset(scenes, manifest: Manifest, split: str, shard_size: int) -> str:
    """shard-%06d.tar of `shard_size` samples each; returns the shards' brace pattern."""
    groups = [scenes[i : i + shard_size] for i in range(0, len(scenes), shard_size)]
    names = [f"shard-{k:06d}.tar" for k in range(len(groups))]
    paths = _claim_all(manifest, names)
    for name, group in zip(names, groups):
        with tarfile.open(paths[name], "w") as tar:
            for scene in group:
                for member, data in _sample_members(scene):
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(manifest.folder / f"shard-{{000000..{len(groups) - 1:06d}}}.tar")


def _sample_members(scene) -> list[tuple[str, bytes]]:
    """The (member name, bytes) of one scene's WebDataset sample: .png, .txt and .json."""
    buffer = io.BytesIO()
    scene.image().save(buffer, format="PNG")
    meta = {"captions": scene.captions(), "conversation": scene.conversation(), "scene": scene.to_dict()}
    key = scene_id(scene)
    return [
        (f"{key}.png", buffer.getvalue()),
        (f"{key}.txt", scene.caption("short").encode("utf-8")),
        (f"{key}.json", json.dumps(meta).encode("utf-8")),
    ]


def _write_folder(scenes, manifest: Manifest, split: str, shard_size: int) -> str:
    """<shape>/<id>.png in the shape folders that receive an image, and classes.txt naming all
    shapes in label order; returns the class root."""
    from polymodal.data.formats.folder import CLASS_LIST
    from polymodal.data.world import SHAPES

    names = [f"{scene.objects[0].shape}/{scene_id(scene)}.png" for scene in scenes]
    paths = _claim_all(manifest, [*names, CLASS_LIST])
    for scene, name in zip(scenes, names):
        scene.image().save(paths[name])
    write_text_atomic(paths[CLASS_LIST], "".join(f"{shape}\n" for shape in sorted(SHAPES)))
    return str(manifest.folder)


def run_export(args: argparse.Namespace) -> None:
    """Handler of `polymodal world export`: export and print where the data went (and which split)."""
    target = export_world(
        args.format, args.out, args.n, split=args.split, image_size=args.image_size, seed=args.seed,
        shard_size=args.shard_size, overwrite=args.overwrite,
    )  # fmt: skip
    print(f"wrote {args.n} {args.split} scenes as {args.format} to {args.out} (read it from {target})")


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register `world export` on the top-level `polymodal` subcommands."""
    world = subparsers.add_parser("world", help="the procedural shapes world")
    commands = world.add_subparsers(dest="world_command", required=True)
    p = commands.add_parser("export", help="write shapes-world scenes as LLaVA JSON, COCO, WebDataset or image folders")
    p.add_argument("--format", choices=FORMATS, required=True)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=1000, help="number of scenes (>= 1)")
    p.add_argument("--split", default="train", help="which split: train (the default), val, test or compositional")
    p.add_argument("--image-size", type=int, default=64, help=f"image side in pixels (16 to {MAX_IMAGE_SIZE})")
    p.add_argument("--seed", type=int, default=0, help="world seed (>= 0)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per WebDataset shard (>= 1)")
    p.add_argument(
        "--overwrite", action="store_true",
        help="replace an earlier world export in --out (only the files it wrote are removed), or write "
        "beside files polymodal did not write (never over them)",
    )  # fmt: skip
    p.set_defaults(func=run_export)
