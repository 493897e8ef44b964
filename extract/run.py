"""`python -m extract`: every image through a frozen encoder once, into the HDF5 cache.

Resumable (rows already done are skipped), crash-safe (see `cache`), and shardable with
`torchrun --nproc-per-node K -m extract ...`: rank r embeds rows r, r+K, r+2K, ... of what is
left to do, writes its own part files, and rank 0 merges them into the one cache. The
pipeline lives in `extract.pipeline`, the encoders in `extract.encoders`; this module is the
command line and the orchestration.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import sys
import time
import warnings

import h5py
import numpy as np
import torch
import torch.distributed as torch_dist
import torchvision
from tqdm import tqdm

import cache
from cache.flags import OneLineParser, Valid, number_type
from cache.runtime import DeviceUnavailable, resolve_device, versions
from cache.schema import SPLITS
from cache.store import safe_text
from extract import datasets, encoders, pipeline
from extract.datasets import nih
from extract.datasets.table import LABEL_METHODS, RATER_POLICIES, UNCERTAIN_POLICIES, DatasetError, Options, parse_views


def get_args_parser(add_help=True):
    parser = OneLineParser("python -m extract", add_help=add_help,
                           description="Embed a chest X-ray dataset's images into the feature cache.")
    parser.add_argument("--dataset", default="nih",
                        help=f"which dataset --data-dir holds: {', '.join(datasets.names())} (default nih); "
                             f"`list` prints what each expects on disk")
    parser.add_argument("--data-dir", default=None,
                        help="the dataset as downloaded (NIH: label CSV, split lists, PNGs; see --dataset list)")
    parser.add_argument("--views", default=None,
                        help="views to keep, e.g. PA,AP,LATERAL (default: frontal, PA and AP)")
    parser.add_argument("--uncertain", default=None, choices=UNCERTAIN_POLICIES,
                        help="chexpert, mimic, csv: uncertain (-1) labels unknown (mask, default), 0 or 1")
    parser.add_argument("--raters", default=None, choices=RATER_POLICIES,
                        help="vindr: a finding is positive when any radiologist or the majority marked it (default)")
    parser.add_argument("--label-method", default=None, choices=LABEL_METHODS,
                        help="padchest: physician-labelled rows only (default) or also the RNN-labelled ones")
    parser.add_argument("--split", default="all", choices=["all", *SPLITS],
                        help="which rows to fill (default: all)")
    parser.add_argument("--cache", default=None,
                        help="the HDF5 cache to create or resume (default: outputs/cache/<backbone>-<size>[-<layers>]"
                             "[-<weights>].h5, weights named unless the family's pretrained default)")
    parser.add_argument("--backbone", default=encoders.DEFAULT_BACKBONE,
                        help="a torchvision model (resnet50, densenet121, convnext_tiny, vit_b_16, ...), "
                             "timm:NAME, hf:REPO_OR_DIR or xrv:NAME (see docs/extract.md)")
    parser.add_argument("--weights", default="pretrained",
                        help="pretrained (the family's own; `imagenet` is an alias), a torchvision weights name "
                             "(IMAGENET1K_V1), a local file or folder, or none (seeded random, tests only)")
    parser.add_argument("--layers", default=None,
                        help="pooled features of these blocks, concatenated: module names (layer3,layer4 for "
                             "ResNets) or last:K for hf: ViTs (CLS of the last K blocks); default: the pooled output")
    parser.add_argument("--pooling", default="cls", choices=encoders.POOLINGS,
                        help="token pooling of transformer outputs: the CLS token, the patch-token mean, or both")
    parser.add_argument("--image-size", type=number_type(int, Valid(32, 4096)), default=None,
                        help="side of the resized square input, 32..4096 (default: the encoder's own, 224 for resnet50)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=["auto", *pipeline.PRECISIONS],
                        help="autocast precision; auto: bf16 on CUDA and on CPUs with native bf16 "
                             "(AVX512-BF16/AMX), fp32 elsewhere")
    parser.add_argument("--feature-dtype", default="float16", choices=["float16", "float32"],
                        help="how features are stored (float16 halves the file, ~1e-3 relative error)")
    parser.add_argument("--batch-size", type=number_type(int, Valid(1, 65536)), default=None,
                        help="model batch, >= 1 (default: 256 on CUDA, 64 on CPU)")
    parser.add_argument("--workers", type=number_type(int, Valid(0, 256)), default=None,
                        help=f"decoding processes, 0 = decode in the main process (default: one per core, "
                             f"at most {pipeline.MAX_WORKERS}); fewer may run to keep decoded images in flight "
                             f"under {pipeline.SHARED_MEMORY_BUDGET >> 20} MB of shared memory")
    parser.add_argument("--val-fraction", type=number_type(float, Valid(0, 1, low_open=True, high_open=True)),
                        default=0.1, help="fraction of train_val_list.txt patients held out for validation, 0<f<1")
    parser.add_argument("--val-list", default=None,
                        help="take val from this list of image ids (a published split of train_val_list.txt) "
                             "instead of the seeded patient split")
    parser.add_argument("--split-seed", type=number_type(int, Valid(0, 2**32 - 1)), default=0,
                        help="seed of the patient-wise val split, 0..2**32-1")
    parser.add_argument("--random-split", action="store_true",
                        help="without official split lists, fall back to a seeded patient-wise split")
    parser.add_argument("--labels-csv", default=None, help="label CSV, if not in --data-dir")
    parser.add_argument("--part-rows", type=number_type(int, Valid(1)), default=1024,
                        help="rows per part file, >= 1: at most this much work is redone after a kill")
    parser.add_argument("--merge-every", type=number_type(int, Valid(0)), default=20000,
                        help="merge part files into the cache every this many rows (0: only at the end)")
    return parser


class SettingsMismatch(Exception):
    """An existing cache made with other settings than the ones asked for."""


def main(args) -> int:
    if args.dataset == "list":
        print(datasets.describe())
        return 0
    if args.data_dir is None:
        print("error: --data-dir is required: the folder of the dataset as downloaded (--dataset list shows "
              "what each expects)", file=sys.stderr)
        return 2
    try:
        return _extract(args)
    except cache.DiskFull as err:  # the work is saved; the run could not finish here: exit 1, not 2
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (DatasetError, encoders.EncoderError, cache.CacheError, SettingsMismatch, DeviceUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: every finished batch is saved; rerun the same command to continue", file=sys.stderr)
        return 130


def _extract(args) -> int:
    ranks = Ranks.from_env()
    device = resolve_device(args.device, local_rank=ranks.local_rank)
    precision = pipeline.resolve_precision(args.precision, device)
    table, provenance = load_rows(args)
    encoder = build_encoder(args, device=device, quiet=ranks.rank != 0)
    cache_path = args.cache or default_cache_path(args, encoder)
    settings = cache_settings(args, encoder=encoder, provenance=provenance, precision=precision)
    with contextlib.ExitStack() as held:
        def lock_and_prepare():  # rank 0 only; a failure here stops every rank
            if os.path.exists(cache_path):  # refuse before making a .lock beside it; again once locked
                refuse_other_settings(cache_path, settings)
            held.enter_context(cache.exclusive_lock(cache_path))
            prepare_cache(cache_path, table=table, settings=settings, data_dir=args.data_dir,
                          header_metadata=datasets.get(args.dataset).header_metadata)

        ranks.run_on_rank0_first(lock_and_prepare)
        stored = cache.read_table(cache_path)
        rows = rows_to_do(stored, args.split)[ranks.rank::ranks.world]
        stats = embed_rows(args, cache_path=cache_path, encoder=encoder, rows=rows, image_ids=stored["image_id"],
                           image_paths=table.get("path"), table_ids=table["image_id"],
                           device=device, precision=precision,
                           fingerprint=cache.read_attrs(cache_path)["fingerprint"], ranks=ranks)
        stats = ranks.combine(stats)
        if ranks.rank != 0:
            return 0
        cache.merge_parts(cache_path)
    return print_summary(cache_path, stats, warning=encoder.warning)


def load_rows(args) -> tuple[dict, dict]:
    """The rows the cache will hold and their provenance. NIH read as it always was (a version-1
    cache: the same rows, labels, splits and fingerprint, now with the optional metadata group)
    unless --views asks for the registry's view filter; every other
    dataset through its registered reader (a version-2 cache), which also refuses the options
    it does not use."""
    registry_only = (args.views, args.uncertain, args.raters, args.label_method)
    if args.dataset == "nih" and all(option is None for option in registry_only):
        return nih.load_dataset(args.data_dir, val_fraction=args.val_fraction, seed=args.split_seed,
                                random_split=args.random_split, labels_csv=args.labels_csv, val_list=args.val_list,
                                with_metadata=True)
    options = Options(views=parse_views(args.views) if args.views is not None else None, uncertain=args.uncertain,
                      raters=args.raters, label_method=args.label_method, labels_csv=args.labels_csv,
                      val_list=args.val_list, random_split=args.random_split, val_fraction=args.val_fraction,
                      seed=args.split_seed)
    rows, provenance = datasets.load(args.dataset, args.data_dir, options)
    if not len(rows["image_id"]):
        raise DatasetError(f"--dataset {args.dataset} in {args.data_dir}: no rows left to embed (check --views "
                           f"and the label options)")
    policies = {key: "n/a" for key in cache.V2_KEYS} | {"split_lists_sha256": ""}
    return rows, policies | provenance


def default_cache_path(args, encoder) -> str:
    """outputs/cache/<backbone>-<size>[-<layers>][-<weights>].h5 for NIH, <dataset>-<...>.h5 for the others."""
    path = encoders.default_cache_path(encoder.backbone, image_size=encoder.preprocessing.size,
                                       layers=encoders.parse_layers(args.layers), weights_tag=encoder.weights_tag)
    if args.dataset == "nih":
        return path
    return os.path.join(os.path.dirname(path), f"{args.dataset}-{os.path.basename(path)}")


def build_encoder(args, *, device, quiet: bool = False) -> encoders.Encoder:
    """The encoder the flags name; its warning (e.g. torchxrayvision's test contamination)
    printed loudly on rank 0."""
    with warnings.catch_warnings(record=True) as raised:
        warnings.simplefilter("always")
        encoder = encoders.build_encoder(args.backbone, weights=args.weights, image_size=args.image_size,
                                         layers=encoders.parse_layers(args.layers), pooling=args.pooling,
                                         device=device)
    # One line each, once: Python's default format adds a file:line and a source line that
    # read like a traceback, and a family that retries its build warns twice.
    for message in dict.fromkeys(str(warning.message) for warning in raised) if not quiet else ():
        print(f"warning: {message}", file=sys.stderr)
    if encoder.warning and not quiet:
        print(f"\n{'!' * 78}\nWARNING: {encoder.warning}\n{'!' * 78}\n", file=sys.stderr)
    return encoder


def cache_settings(args, *, encoder: encoders.Encoder, provenance: dict, precision: str) -> dict:
    return {
        **provenance,
        **encoder.weights,
        "backbone": encoder.backbone,
        "image_size": int(encoder.preprocessing.size),
        "precision": precision,
        "preprocessing": encoder.recipe(),
        "feature_dtype": args.feature_dtype,
        "feature_dim": encoder.feature_dim,
        "encoder_warning": encoder.warning,
        "schema_version": 2 if "dataset" in provenance else 1,
        "versions": versions(torchvision=torchvision.__version__, h5py=h5py.__version__, **_extra_versions()),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _extra_versions() -> dict:
    found = {}
    for module in ("timm", "transformers", "torchxrayvision"):
        if module in sys.modules:
            found[module] = getattr(sys.modules[module], "__version__", "?")
    return found


def prepare_cache(path, *, table: dict, settings: dict, data_dir=None, header_metadata: bool = False) -> None:
    """Create the cache, or check that the existing one was made with the same settings, and
    fold in any part files a killed run left behind. header_metadata: fill sex, age and view
    from the DICOM headers before creating (once per cache; see datasets.add_header_metadata).
    A version-1 cache made before the metadata group gets it from `table` (no image is embedded
    again: the rows and fingerprint are the ones the same settings give)."""
    if not os.path.exists(path):
        if header_metadata:
            table, unread = datasets.add_header_metadata(table, data_dir)
            print(f"metadata: read {len(table['image_id']) - unread} DICOM headers"
                  + (f"; {unread} unreadable (their sex, age and view are missing)" if unread else ""))
        cache.create_cache(path, table=table, feature_dim=settings["feature_dim"],
                           feature_dtype=settings["feature_dtype"], attrs=settings)
        return
    refuse_other_settings(path, settings)
    merged = cache.merge_parts(path)
    if merged:
        print(f"merged {merged} rows that an interrupted run left in part files")
    if "sex" in table and cache.read_metadata(path) is None:
        cache.add_metadata(path, table)
        print(f"added the per-row metadata (sex, age, view, follow-up) from {settings.get('source_csv')} to {path}")


def refuse_other_settings(path, settings: dict) -> None:
    """SettingsMismatch naming each difference when the cache at `path` was made otherwise
    (CacheError when it is no cache)."""
    stored = cache.read_attrs(path)
    differences = [
        line for key in (*cache.FINGERPRINT_KEYS, *cache.V2_KEYS) if key in settings
        for line in _differences(key, _comparable(stored.get(key)), _comparable(settings[key]))
    ]
    if differences:
        raise SettingsMismatch(
            f"{path} was made with other settings; refusing to mix features:\n  "
            + "\n  ".join(differences) + "\nuse another --cache, or the settings it was made with")


def _differences(key: str, stored, asked) -> list[str]:
    """One line per differing setting; a JSON setting (preprocessing) by its differing keys,
    so that the message names what changed rather than printing two whole recipes."""
    if isinstance(stored, dict) and isinstance(asked, dict):
        return [line for sub in sorted(set(stored) | set(asked))
                for line in _differences(f"{key}.{sub}", stored.get(sub), asked.get(sub))]
    return [] if stored == asked else [f"{key}: cache has {stored!r}, this run asks {asked!r}"]


def _comparable(value):
    if isinstance(value, dict):
        return {key: _comparable(v) for key, v in value.items()}
    return [_comparable(v) for v in value] if isinstance(value, (list, tuple)) else value


def rows_to_do(table: dict, split: str) -> np.ndarray:
    """Cache rows of `split` (or all) not done yet."""
    wanted = np.ones(len(table["done"]), bool) if split == "all" else table["split"] == split
    return np.flatnonzero(wanted & ~table["done"])


def embed_rows(args, *, cache_path, encoder, rows, image_ids, device, precision, fingerprint, ranks,
               image_paths=None, table_ids=None) -> dict:
    """Embed `rows` of the cache, writing part files as it goes; returns counts and timing.
    `image_paths`: each table row's image relative to --data-dir (registry readers); without
    them the NIH images are found by name."""
    paths = image_files(args.data_dir, rows=rows, image_ids=image_ids, image_paths=image_paths, table_ids=table_ids)
    cuda = device.type == "cuda"
    model_batches = pipeline.batches(
        rows, paths, encoder=encoder, batch_size=args.batch_size or (256 if cuda else 64),
        workers=args.workers if args.workers is not None else pipeline.default_workers(), pin_memory=cuda)
    sink = PartSink(cache_path, fingerprint=fingerprint, feature_dtype=args.feature_dtype, tag=f"r{ranks.rank}",
                    part_rows=args.part_rows, merge_every=args.merge_every if ranks.rank == 0 else 0)
    start = time.perf_counter()
    progress = tqdm(total=len(rows), unit="img", desc=f"extract[{ranks.rank}]" if ranks.world > 1 else "extract",
                    dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)
    try:
        for batch in model_batches:
            features = pipeline.embed_batch(encoder, batch, device=device, precision=precision) \
                if len(batch["rows"]) else None
            sink.add(batch["rows"].numpy(), features, batch["failed"])
            progress.update(len(batch["rows"]) + len(batch["failed"]))
    finally:
        sink.flush()
        progress.close()
    return {"done": sink.done, "failed": sink.failed, "seconds": time.perf_counter() - start,
            "device": str(device), "precision": precision, "merges": sink.merges}


def image_files(data_dir, *, rows, image_ids, image_paths, table_ids) -> list:
    """The file of each cache row in `rows` (None where not found: a failed row)."""
    if image_paths is None:
        found = nih.index_images(data_dir)
        if len(rows) and not found:
            raise DatasetError(f"no PNG images under {data_dir}: expected images/ or images_001/images/ ...")
        return [found.get(image_ids[row]) for row in rows]
    relative = dict(zip(table_ids, image_paths))
    return [os.path.join(data_dir, relative[image_ids[row]]) for row in rows]


class PartSink:
    """Buffers finished rows and writes them as part files; rank 0 also merges periodically."""

    def __init__(self, cache_path, *, fingerprint, feature_dtype, tag, part_rows, merge_every):
        self.cache_path, self.part_rows, self.merge_every = cache_path, part_rows, merge_every
        self.feature_dtype = feature_dtype
        self.writer = cache.PartWriter(cache_path, fingerprint=fingerprint, tag=tag)
        self.rows, self.features, self.failed_buffer = [], [], []
        self.done, self.failed, self.since_merge, self.merges = 0, [], 0, 0

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
        # The writer turns non-finite embeddings into failed rows; count them as failures.
        non_finite = self.writer.write(rows=rows, features=features,
                                       failed_rows=[row for row, _ in self.failed_buffer],
                                       failed_reasons=[reason for _, reason in self.failed_buffer])
        self.done += len(rows) - len(non_finite)
        self.failed += self.failed_buffer + non_finite
        self.since_merge += len(rows) + len(self.failed_buffer)
        self.rows, self.features, self.failed_buffer = [], [], []
        if self.merge_every and self.since_merge >= self.merge_every:
            cache.merge_parts(self.cache_path)
            self.since_merge = 0
            self.merges += 1


def print_summary(cache_path, stats, *, warning: str = "") -> int:
    table = cache.read_table(cache_path)
    rate = stats["done"] / stats["seconds"] if stats["seconds"] > 0 else 0.0
    print(f"\nextracted {stats['done']} images in {stats['seconds']:.1f}s ({rate:.1f} img/s on "
          f"{stats['device']}, {stats['precision']}); {len(stats['failed'])} failed; "
          f"{stats['merges']} merges during the run")
    for split in SPLITS:
        in_split = table["split"] == split
        print(f"  {split:<5} {int((in_split & table['done']).sum()):>7} / {int(in_split.sum()):>7} rows done")
    print(f"cache: {os.path.abspath(cache_path)}")
    if warning:
        print(f"WARNING: {warning}")
    if stats["failed"]:
        print(f"\n{len(stats['failed'])} images could not be embedded (their rows stay not done; "
              f"fix the files and rerun to fill them):")
        for row, reason in sorted(stats["failed"]):
            print(f"  {table['image_id'][row]}: {safe_text(reason)}")  # a non-UTF-8 path prints escaped
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
