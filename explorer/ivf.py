"""FAISS indexes of a bucket: flat, and IVF for large training sets (the rule for nlist and nprobe,
building, calibrating nprobe, inverted lists on disk).

A flat index compares a query with all N rows: O(N k) per query, too slow past a few hundred
thousand rows (bench/index_scale.py). An IVF index splits the rows into nlist inverted lists by
spherical k-means (inner product; FAISS turns `spherical` on for METRIC_INNER_PRODUCT) and scans
only the nprobe lists whose centroids score highest against the query: O(nlist k + nprobe N / nlist k).
Negative influencers are a search with -query, which probes the lists most anti-aligned with it.
-query lies far from the data (nothing is near the opposite of a training gradient), where the
centroids discriminate less, so it needs more lists for the same recall: nprobe is calibrated
separately for q and for -q.

The rule (measured in bench/index_scale.py, docs/benchmarks/index_scale.md):
- nlist = round(NLIST_PER_SQRT_N * sqrt(N)), at most N / MIN_ROWS_PER_LIST (k-means needs rows).
- nprobe starts at NPROBE_FRACTION * nlist and is calibrated per bucket and per sign: it doubles
  until the recall@10 of the IVF search against the exact one reaches TARGET_RECALL, for q on
  CALIBRATION_QUERIES stored rows (their own row left out) and on the same rows moved off the data
  by noise (real queries are not training rows), for -q on the negated rows. Calibration is a
  check on the index's own data; bench/index_scale.py measures held-out queries.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from explorer.errors import ExplorerError

logger = logging.getLogger(__name__)

NLIST_PER_SQRT_N = 4.0  # nlist ~ 4 sqrt(N): 4,000 lists for 1M rows (1,000 needed 4x the latency for -q)
MIN_ROWS_PER_LIST = 39  # FAISS warns below 39 training points per centroid
NPROBE_FRACTION = 1 / 256  # first nprobe tried: 16 of 4,000 lists at 1M rows
TARGET_RECALL = 0.95  # recall@10 that calibration must reach
CALIBRATION_QUERIES = 200
CALIBRATION_SEED = 0
CALIBRATION_NOISE = (
    1.0  # off-data calibration queries: row + noise of this norm (relative), cosine ~0.7 to the row
)
KMEANS_POINTS_PER_LIST = 64  # k-means trains on at most this many sampled rows per list (FAISS: 256)


@dataclass
class IVFParams:
    """nlist for every bucket; per bucket, nprobe for q and for -q and their calibration recall@10."""

    nlist: int
    nprobe: list[int] = field(default_factory=list)
    nprobe_negative: list[int] = field(default_factory=list)
    recall_at_10: list[float] = field(default_factory=list)
    recall_at_10_negative: list[float] = field(default_factory=list)
    rule: str = ""
    on_disk: bool = False  # the lists live in bucket_BB.ivfdata next to the bucket file, memory-mapped

    def add_bucket(self, chosen: dict[int, tuple[int, float]]) -> None:
        """chosen: {+1: (nprobe, recall), -1: (nprobe, recall)} of one bucket, from calibrate_nprobe."""
        self.nprobe.append(chosen[1][0])
        self.recall_at_10.append(chosen[1][1])
        self.nprobe_negative.append(chosen[-1][0])
        self.recall_at_10_negative.append(chosen[-1][1])

    def to_meta(self) -> dict:
        return {
            "nlist": self.nlist,
            "nprobe": list(self.nprobe),
            "nprobe_negative": list(self.nprobe_negative),
            "recall_at_10": [round(r, 4) for r in self.recall_at_10],
            "recall_at_10_negative": [round(r, 4) for r in self.recall_at_10_negative],
            "target_recall": TARGET_RECALL,
            "rule": self.rule,
            "on_disk": self.on_disk,
        }


def build_bucket_index(
    vectors: np.ndarray,
    storage: str,
    ivf: IVFParams | None = None,
    nprobe: int | None = None,
    ivfdata: Path | None = None,
) -> faiss.Index:
    """A flat index of the rows, or with `ivf` an IVF index trained on them (nprobe calibrated unless
    given; the choice is appended to `ivf`), its lists in the file `ivfdata` when given."""
    dim = vectors.shape[1]
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # a float32 memmap: a view, no copy
    if ivf is not None:
        index = build_ivf(vectors, storage, ivf.nlist)
        if ivfdata is not None:
            fill_on_disk(index, vectors, ivfdata)
        else:
            add_rows(index, vectors)
        ivf.add_bucket(calibrate_nprobe(index, vectors, nprobe))
        return index
    if storage == "float32":
        index = faiss.IndexFlatIP(dim)
    elif storage == "float16":
        index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    else:  # int8: 8 bits per dimension with a per-dimension range learned from the vectors themselves
        index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
    index.add(vectors)
    return index


def nlist_rule(count: int) -> int:
    """nlist from the number of rows N (see the module docstring)."""
    return int(max(1, min(round(NLIST_PER_SQRT_N * math.sqrt(count)), count // MIN_ROWS_PER_LIST)))


def check_ivf_request(count: int, nlist: int | None, nprobe: int | None) -> int:
    """The nlist to use for N rows (the rule unless given); refuse impossible values, naming them."""
    if nlist is None:
        nlist = nlist_rule(count)
    if not isinstance(nlist, int) or isinstance(nlist, bool) or not 1 <= nlist <= count:
        raise ExplorerError(
            f"ivf_nlist {nlist!r} must be an integer between 1 and the {count} training rows "
            f"(leave it out for the rule's {nlist_rule(count)})",
            ("ivf_nlist",),
        )
    if nprobe is not None and (
        not isinstance(nprobe, int) or isinstance(nprobe, bool) or not 1 <= nprobe <= nlist
    ):
        raise ExplorerError(
            f"ivf_nprobe {nprobe!r} must be an integer between 1 and nlist {nlist} "
            "(leave it out to calibrate it)",
            ("ivf_nprobe",),
        )
    return nlist


def build_ivf(vectors: np.ndarray, storage: str, nlist: int, seed: int = CALIBRATION_SEED) -> faiss.IndexIVF:
    """An inner-product IVF index over (N, k) float32 rows, trained on them, rows not yet added."""
    dim = vectors.shape[1]
    quantizer = faiss.IndexFlatIP(dim)
    if storage == "float32":
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    else:  # float16 or int8 codes in the lists (the int8 range is trained with the lists)
        kind = faiss.ScalarQuantizer.QT_fp16 if storage == "float16" else faiss.ScalarQuantizer.QT_8bit
        index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, kind, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.cp.max_points_per_centroid = KMEANS_POINTS_PER_LIST
    index.train(vectors)
    return index


def add_rows(index: faiss.Index, vectors: np.ndarray, block: int = 100_000) -> None:
    """index.add in blocks of rows: FAISS encodes a whole add() batch before filling the lists, which
    would otherwise hold a second copy of all rows (2 GB at 1M x 512)."""
    for start in range(0, len(vectors), block):
        index.add(np.ascontiguousarray(vectors[start : start + block], dtype=np.float32))


def fill_on_disk(index: faiss.IndexIVF, vectors: np.ndarray, ivfdata: Path, block: int = 100_000) -> None:
    """Fill a trained, empty IVF index with the rows, its inverted lists on disk in `ivfdata`: each block of
    rows goes into its own copy of the index (add_with_ids, ids = row positions), written as a shard file,
    and FAISS's on-disk merge streams the shards' lists into one file, so the lists never all sit in memory.
    The index then reads its lists from `ivfdata` (FAISS OnDiskInvertedLists, memory-mapped)."""
    from faiss.contrib.ondisk import merge_ondisk

    with tempfile.TemporaryDirectory(dir=ivfdata.parent, prefix=".ivf-shards-") as scratch:
        shards = []
        for start in range(0, len(vectors), block):
            rows = np.ascontiguousarray(vectors[start : start + block], dtype=np.float32)
            shard = faiss.clone_index(index)
            shard.add_with_ids(rows, np.arange(start, start + len(rows), dtype=np.int64))
            shards.append(str(Path(scratch) / f"shard_{len(shards):05d}.faiss"))
            faiss.write_index(shard, shards[-1])
            del shard
        merge_ondisk(index, shards, str(ivfdata))


def exact_top(vectors: np.ndarray, queries: np.ndarray, top: int, chunk: int = 16) -> np.ndarray:
    """Row positions of the exact top-`top` inner products, (Q, top), best first (in chunks of
    queries: each holds (chunk, N) scores and argpartition's (chunk, N) int64 positions)."""
    out = np.empty((len(queries), top), dtype=np.int64)
    for start in range(0, len(queries), chunk):
        scores = queries[start : start + chunk] @ vectors.T  # (c, N)
        part = np.argpartition(-scores, top - 1, axis=1)[:, :top]
        order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1)
        out[start : start + chunk] = np.take_along_axis(part, order, axis=1)
    return out


def recall_at_10(
    index: faiss.IndexIVF,
    queries: np.ndarray,
    exact: np.ndarray,
    nprobe: int,
    own_rows: np.ndarray | None = None,
) -> float:
    """Mean recall@10 of the IVF search at nprobe against the exact top (Q, 11). With own_rows, the
    query's own row is left out of both lists (a stored row used as a query)."""
    _, found = index.search(
        queries, 11, params=faiss.SearchParametersIVF(nprobe=nprobe)
    )  # (Q, 11), -1 past the lists
    own = (
        own_rows if own_rows is not None else np.full(len(queries), -2)
    )  # -2: matches no row and no -1 padding
    hits = [
        len(set(f[(f != row) & (f >= 0)][:10].tolist()) & set(e[e != row][:10].tolist())) / 10
        for f, e, row in zip(found, exact, own)
    ]
    return float(np.mean(hits))


def calibration_queries(vectors: np.ndarray) -> dict[int, list[tuple[np.ndarray, np.ndarray | None]]]:
    """Query sets per sign: {+1: [stored rows (own row left out), stored rows moved off the data],
    -1: [negated stored rows]}, each (queries (Q, k), own rows or None).

    The explorer's queries (x0hat of generated images, uploaded images) lie off the training rows,
    and a stored row finds its neighbours in its own list; so q is also calibrated on rows plus
    isotropic noise of norm CALIBRATION_NOISE times the row's norm (cosine ~0.7 to the row)."""
    rng = np.random.default_rng(CALIBRATION_SEED)
    rows = np.sort(rng.choice(len(vectors), size=min(CALIBRATION_QUERIES, len(vectors)), replace=False))
    stored = vectors[rows].astype(np.float32)
    norms = np.linalg.norm(stored, axis=1, keepdims=True)
    noise = rng.standard_normal(stored.shape).astype(np.float32) * (
        CALIBRATION_NOISE / np.sqrt(stored.shape[1])
    )
    moved = stored + norms * noise
    return {
        1: [(stored, rows), (np.ascontiguousarray(moved), None)],
        -1: [(np.ascontiguousarray(-stored), rows)],
    }


def calibrate_nprobe(
    index: faiss.IndexIVF, vectors: np.ndarray, nprobe: int | None = None
) -> dict[int, tuple[int, float]]:
    """nprobe for q (+1) and for -q (-1): the given one, or the smallest of start, 2 start, ..., nlist
    (start = nlist * NPROBE_FRACTION) whose recall@10 reaches TARGET_RECALL on every query set of
    `calibration_queries`; with that recall@10 (the lowest over the sets)."""
    chosen = {}
    for sign, sets in calibration_queries(vectors).items():
        exact = [exact_top(vectors, queries, min(11, len(vectors))) for queries, _ in sets]
        trial = nprobe if nprobe is not None else max(1, round(index.nlist * NPROBE_FRACTION))
        while True:
            recall = min(
                recall_at_10(index, queries, top, trial, own) for (queries, own), top in zip(sets, exact)
            )
            if nprobe is not None or recall >= TARGET_RECALL or trial == index.nlist:
                break
            trial = min(index.nlist, trial * 2)
        if recall < TARGET_RECALL:
            logger.warning(
                "IVF recall@10 %.3f < %.2f for %sq at nprobe %d of nlist %d",
                recall,
                TARGET_RECALL,
                "" if sign > 0 else "-",
                trial,
                index.nlist,
            )
        chosen[sign] = (trial, recall)
    index.nprobe = chosen[1][0]
    return chosen


def rule_text(nlist_given: bool, nprobe_given: bool) -> str:
    nlist = (
        "given" if nlist_given else f"nlist = round({NLIST_PER_SQRT_N:g} sqrt(N)), <= N/{MIN_ROWS_PER_LIST}"
    )
    nprobe = (
        "given"
        if nprobe_given
        else f"nprobe from nlist/{round(1 / NPROBE_FRACTION)} doubled until recall@10 >= "
        f"{TARGET_RECALL} on {CALIBRATION_QUERIES} stored rows (self left out) and the rows moved off "
        "the data by "
        f"noise of {CALIBRATION_NOISE:g} x their norm (q), and the negated rows (-q)"
    )
    return f"{nlist}; {nprobe}"


def check_kind(
    index: faiss.Index, index_type: str, params: IVFParams | None, bucket: int, where: str
) -> None:
    """A bucket's FAISS file (`where`: its name and directory) must be the kind meta.json says: flat, or IVF
    with its nlist; sets an IVF's nprobe."""
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ExplorerError(f"{where} is not an inner-product index: rebuild the index")
    ivf = faiss.try_extract_index_ivf(index)
    if index_type == "flat":
        if ivf is not None:
            raise ExplorerError(
                f"{where} is an IVF index but meta.json says index_type flat: rebuild the index"
            )
        return
    if ivf is None:
        raise ExplorerError(
            f"{where} is not an IVF index but meta.json says index_type ivf: rebuild the index"
        )
    if ivf.nlist != params.nlist:
        raise ExplorerError(
            f"{where} has {ivf.nlist} IVF lists, meta.json says ivf.nlist {params.nlist}: rebuild the index"
        )
    ivf.nprobe = params.nprobe[bucket]  # what a plain FAISS search uses; search() passes it per call
