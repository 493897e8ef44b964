"""`python -m extract`: every image through the frozen backbone once, into the HDF5 cache.

Resumable (rows already done are skipped), crash-safe (see `cache`), and shardable with
`torchrun --nproc-per-node K -m extract ...`: rank r embeds rows r, r+K, r+2K, ... of what is
left to do, writes its own part files, and rank 0 merges them into the one cache.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
import time
import warnings
from collections import defaultdict

import h5py
import numpy as np
import torch
import torch.distributed as torch_dist
import torchvision
from tqdm import tqdm

import cache
from cache.runtime import DeviceUnavailable, resolve_device, versions
from cache.schema import SPLITS
from extract import backbone, images, nih

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser("python -m extract", add_help=add_help,
                                     description="Embed NIH ChestX-ray14 images into the feature cache.")
    parser.add_argument("--data-dir", required=True, help="the NIH download: label CSV, split lists, PNGs")
    parser.add_argument("--split", default="all", choices=["all", *SPLITS],
                        help="which rows to fill (default: all)")
    parser.add_argument("--cache", default=cache.DEFAULT_CACHE, help="the HDF5 cache to create or resume")
    parser.add_argument("--weights", default="imagenet",
                        help="imagenet (=IMAGENET1K_V2), IMAGENET1K_V1, a state-dict PATH, or none (tests)")
    parser.add_argument("--image-size", type=int, default=224, help="side of the resized square input")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS],
                        help="autocast precision; auto: bf16 on CUDA, fp32 on CPU (fastest measured there)")
    parser.add_argument("--feature-dtype", default="float16", choices=["float16", "float32"],
                        help="how features are stored (float16 halves the file, ~1e-3 relative error)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 256 on CUDA, 64 on CPU")
    parser.add_argument("--workers", type=int, default=None, help="decode processes (default: all cores)")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="fraction of train_val_list.txt patients held out for validation")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the patient-wise val split")
    parser.add_argument("--random-split", action="store_true",
                        help="without official split lists, fall back to a seeded patient-wise split")
    parser.add_argument("--labels-csv", default=None, help="label CSV, if not in --data-dir")
    parser.add_argument("--part-rows", type=int, default=1024,
                        help="rows per part file: at most this much work is redone after a kill")
    parser.add_argument("--merge-every", type=int, default=20000,
                        help="merge part files into the cache every this many rows")
    return parser


class SettingsMismatch(Exception):
    """An existing cache made with other settings than the ones asked for."""


def main(args) -> int:
    try:
        return _extract(args)
    except (nih.DatasetError, backbone.WeightsError, cache.CacheError, SettingsMismatch, DeviceUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: every finished batch is saved; rerun the same command to continue", file=sys.stderr)
        return 130


def _extract(args) -> int:
    ranks = Ranks.from_env()
    device = resolve_device(args.device, local_rank=ranks.local_rank)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    table, provenance = nih.load_dataset(args.data_dir, val_fraction=args.val_fraction,
                                         seed=args.split_seed, random_split=args.random_split,
                                         labels_csv=args.labels_csv)
    settings = cache_settings(args, provenance=provenance, precision=precision)
    with contextlib.ExitStack() as held:
        def lock_and_prepare():  # rank 0 only; a failure here stops every rank
            held.enter_context(cache.exclusive_lock(args.cache))
            prepare_cache(args.cache, table=table, settings=settings)

        ranks.run_on_rank0_first(lock_and_prepare)
        stored = cache.read_table(args.cache)
        rows = rows_to_do(stored, args.split)[ranks.rank::ranks.world]
        stats = embed_rows(args, rows=rows, image_ids=stored["image_id"], device=device, precision=precision,
                           fingerprint=cache.read_attrs(args.cache)["fingerprint"], ranks=ranks)
        stats = ranks.combine(stats)
        if ranks.rank != 0:
            return 0
        cache.merge_parts(args.cache)
    return print_summary(args, stats)




def cache_settings(args, *, provenance: dict, precision: str) -> dict:
    mean, std = backbone.normalization(args.weights)
    return {
        **provenance,
        **backbone.describe_weights(args.weights),
        "backbone": backbone.BACKBONE,
        "image_size": int(args.image_size),
        "precision": precision,
        "preprocessing": images.preprocessing_record(image_size=args.image_size, mean=mean, std=std),
        "feature_dtype": args.feature_dtype,
        "feature_dim": backbone.FEATURE_DIM,
        "schema_version": cache.SCHEMA_VERSION,
        "versions": versions(torchvision=torchvision.__version__, h5py=h5py.__version__),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def prepare_cache(path, *, table: dict, settings: dict) -> None:
    """Create the cache, or check that the existing one was made with the same settings, and
    fold in any part files a killed run left behind."""
    if not os.path.exists(path):
        cache.create_cache(path, table=table, feature_dim=settings["feature_dim"],
                           feature_dtype=settings["feature_dtype"], attrs=settings)
        return
    stored = cache.read_attrs(path)
    differences = [
        f"{key}: cache has {stored.get(key)!r}, this run asks {settings[key]!r}"
        for key in cache.FINGERPRINT_KEYS
        if _comparable(stored.get(key)) != _comparable(settings[key])
    ]
    if differences:
        raise SettingsMismatch(
            f"{path} was made with other settings; refusing to mix features:\n  "
            + "\n  ".join(differences) + "\nuse another --cache, or the settings it was made with")
    merged = cache.merge_parts(path)
    if merged:
        print(f"merged {merged} rows that an interrupted run left in part files")


def _comparable(value):
    return [_comparable(v) for v in value] if isinstance(value, (list, tuple)) else value


def rows_to_do(table: dict, split: str) -> np.ndarray:
    """Cache rows of `split` (or all) not done yet."""
    wanted = np.ones(len(table["done"]), bool) if split == "all" else table["split"] == split
    return np.flatnonzero(wanted & ~table["done"])


# ---------------------------------------------------------------------------------------------
# The pipeline: DataLoader workers decode, the model device resizes and embeds.


class ImageRows(torch.utils.data.Dataset):
    """Decodes one cache row's image. Failures are returned, not raised, so that one bad file
    never stops a run. `resize_to` resizes in the worker (CPU runs); None leaves it to the GPU."""

    def __init__(self, rows, paths, resize_to):
        self.rows, self.paths, self.resize_to = rows, paths, resize_to

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        row, path = int(self.rows[index]), self.paths[index]
        if path is None:
            return row, None, "image file not found under --data-dir"
        try:
            gray = images.load_gray(path)
        except images.ImageError as err:
            return row, None, str(err)
        if self.resize_to:
            gray = images.resize_gray(gray, self.resize_to)
        return row, gray, ""


def collate_by_shape(items):
    """Stack images of equal shape (nearly always all of them), so that each group is one
    pinned tensor and one host-to-device copy."""
    rows, failed, members = [], [], defaultdict(list)
    for row, gray, reason in items:
        if gray is None:
            failed.append((row, reason))
            continue
        members[tuple(gray.shape)].append((len(rows), gray))
        rows.append(row)
    groups = [(torch.tensor([position for position, _ in group]), torch.stack([gray for _, gray in group]))
              for group in members.values()]
    return {"rows": torch.tensor(rows, dtype=torch.long), "groups": groups, "failed": failed}


def embed_batch(model, batch, *, image_size, mean, std, device, precision) -> torch.Tensor:
    """(B, D) float32 features on the CPU, in the order of batch["rows"]."""
    gray = torch.empty(len(batch["rows"]), image_size, image_size, device=device)
    for positions, stacked in batch["groups"]:
        stacked = stacked.to(device, non_blocking=True)
        if stacked.dtype == torch.uint8:
            stacked = images.resize_gray(stacked, image_size)
        gray[positions.to(device)] = stacked
    inputs = images.normalize(gray, mean, std)
    autocast = PRECISIONS[precision]
    with torch.inference_mode(), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        return model(inputs).float().cpu()


def embed_rows(args, *, rows, image_ids, device, precision, fingerprint, ranks) -> dict:
    """Embed `rows` of the cache, writing part files as it goes; returns counts and timing."""
    found = nih.index_images(args.data_dir)
    if len(rows) and not found:
        raise nih.DatasetError(f"no PNG images under {args.data_dir}: expected images/ or images_001/images/ ...")
    paths = [found.get(image_ids[row]) for row in rows]
    cuda = device.type == "cuda"
    workers = args.workers if args.workers is not None else min(os.cpu_count() or 1, 16)
    loader = torch.utils.data.DataLoader(
        ImageRows(rows, paths, resize_to=None if cuda else args.image_size),
        batch_size=args.batch_size or (256 if cuda else 64), num_workers=workers,
        collate_fn=collate_by_shape, pin_memory=cuda, persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )
    with warnings.catch_warnings():
        if args.weights.lower() == "none" and ranks.rank != 0:
            warnings.simplefilter("ignore")
        model = backbone.build_backbone(args.weights, device=device)
    mean, std = backbone.normalization(args.weights)
    sink = PartSink(args.cache, fingerprint=fingerprint, feature_dtype=args.feature_dtype, tag=f"r{ranks.rank}",
                    part_rows=args.part_rows, merge_every=args.merge_every if ranks.rank == 0 else 0)
    start = time.perf_counter()
    progress = tqdm(total=len(rows), unit="img", desc=f"extract[{ranks.rank}]" if ranks.world > 1 else "extract",
                    dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)
    try:
        for batch in loader:
            features = embed_batch(model, batch, image_size=args.image_size, mean=mean, std=std,
                                   device=device, precision=precision) if len(batch["rows"]) else None
            sink.add(batch["rows"].numpy(), features, batch["failed"])
            progress.update(len(batch["rows"]) + len(batch["failed"]))
    finally:
        sink.flush()
        progress.close()
    return {"done": sink.done, "failed": sink.failed, "seconds": time.perf_counter() - start,
            "device": str(device), "precision": precision}


class PartSink:
    """Buffers finished rows and writes them as part files; rank 0 also merges periodically."""

    def __init__(self, cache_path, *, fingerprint, feature_dtype, tag, part_rows, merge_every):
        self.cache_path, self.part_rows, self.merge_every = cache_path, part_rows, merge_every
        self.feature_dtype = feature_dtype
        self.writer = cache.PartWriter(cache_path, fingerprint=fingerprint, tag=tag)
        self.rows, self.features, self.failed_buffer = [], [], []
        self.done, self.failed, self.since_merge = 0, [], 0

    def add(self, rows, features, failed) -> None:
        if len(rows):
            self.rows.append(rows)
            self.features.append(features.numpy())
        self.failed_buffer += failed
        if sum(len(r) for r in self.rows) + len(self.failed_buffer) >= self.part_rows:
            self.flush()

    def flush(self) -> None:
        if not self.rows and not self.failed_buffer:
            return
        rows = np.concatenate(self.rows) if self.rows else np.zeros(0, np.int64)
        features = np.concatenate(self.features) if self.features else np.zeros((0, 0), np.float32)
        features = features.astype(self.feature_dtype)
        self.writer.write(rows=rows, features=features,
                          failed_rows=[row for row, _ in self.failed_buffer],
                          failed_reasons=[reason for _, reason in self.failed_buffer])
        self.done += len(rows)
        self.failed += self.failed_buffer
        self.since_merge += len(rows) + len(self.failed_buffer)
        self.rows, self.features, self.failed_buffer = [], [], []
        if self.merge_every and self.since_merge >= self.merge_every:
            cache.merge_parts(self.cache_path)
            self.since_merge = 0


def print_summary(args, stats) -> int:
    table = cache.read_table(args.cache)
    rate = stats["done"] / stats["seconds"] if stats["seconds"] > 0 else 0.0
    print(f"\nextracted {stats['done']} images in {stats['seconds']:.1f}s ({rate:.1f} img/s on "
          f"{stats['device']}, {stats['precision']}); {len(stats['failed'])} failed")
    for split in SPLITS:
        in_split = table["split"] == split
        print(f"  {split:<5} {int((in_split & table['done']).sum()):>7} / {int(in_split.sum()):>7} rows done")
    print(f"cache: {os.path.abspath(args.cache)}")
    if stats["failed"]:
        print(f"\n{len(stats['failed'])} images could not be embedded (their rows stay not done; "
              f"fix the files and rerun to fill them):")
        for row, reason in sorted(stats["failed"]):
            print(f"  {table['image_id'][row]}: {reason}")
        return 1
    return 0


class Ranks:
    """This process's place under torchrun (rank 0 of 1 when run plainly)."""

    def __init__(self, rank: int, world: int, local_rank: int):
        self.rank, self.world, self.local_rank = rank, world, local_rank

    @classmethod
    def from_env(cls) -> "Ranks":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        ranks = cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
        if world > 1 and not torch_dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            torch_dist.init_process_group(backend, timeout=datetime.timedelta(hours=12))
        return ranks

    def combine(self, stats: dict) -> dict:
        """Every rank's counts summed (also a barrier: all parts are written after it)."""
        if self.world == 1:
            return stats
        everyone = [None] * self.world
        torch_dist.all_gather_object(everyone, stats)
        torch_dist.destroy_process_group()
        return {**stats, "done": sum(s["done"] for s in everyone), "seconds": max(s["seconds"] for s in everyone),
                "failed": [f for s in everyone for f in s["failed"]], "device": f"{self.world} ranks, {stats['device']}"}

    def run_on_rank0_first(self, step) -> None:
        """Run `step` on rank 0 while the others wait; an error there stops every rank."""
        error = None
        if self.rank == 0:
            try:
                step()
            except Exception as err:  # re-raised below, after the other ranks heard of it
                error = err
        if self.world > 1:
            message = [f"{type(error).__name__}: {error}" if error else None]
            torch_dist.broadcast_object_list(message, src=0)
            if message[0] and error is None:
                raise cache.CacheError(f"rank 0 failed to prepare the cache: {message[0]}")
        if error:
            raise error
