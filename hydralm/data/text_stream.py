"""Streamed text (hub datasets, or local files with ``streaming=True``): rows of one rank's share,
with an exact resume that re-reads and skips what was already trained on.

Sharding is done by HF: ``split_dataset_by_node`` over ranks (by TextDataModule), then whole shards
over DataLoader workers. torch takes batches from workers round-robin, so after ``b`` batches worker
``w`` had made ``ceil((b - w) / W)`` of them; a resumed run skips exactly those in each worker and
rotates the round-robin so the worker whose turn was next comes first.
"""

from __future__ import annotations

import datasets
from torch.utils.data import IterableDataset, get_worker_info

from hydralm.data.corpus import iter_texts
from hydralm.data.resumable import PositionedDataLoader
from hydralm.data.windows import DocumentEncoder, document_windows, window_to_row


def _batches_made_by_worker(batches: int, num_workers: int, worker: int) -> int:
    """torch's DataLoader takes batches from workers round-robin: worker w made batches w, w+W, ..."""
    return max(0, (batches - worker + num_workers - 1) // num_workers)


class StreamingTextWindows(IterableDataset):
    """Rows from a streamed corpus, one rank's share; skips the rows a resumed run already trained on."""

    def __init__(
        self,
        stream: datasets.IterableDataset,
        text_field: str,
        encoder: DocumentEncoder,
        seq_len: int,
        pad_id: int,
        batch_size: int,
        skip_batches: int = 0,
        epoch: int = 0,
    ) -> None:
        self.stream, self.text_field, self.encoder = stream, text_field, encoder
        self.seq_len, self.pad_id, self.batch_size = seq_len, pad_id, batch_size
        self.skip_batches, self.first_epoch, self.epoch, self._iterations = skip_batches, epoch, epoch, 0

    def on_new_iterator(self) -> None:
        """Called in the main process before each epoch's iterator (and before workers copy us)."""
        self.epoch = self.first_epoch + self._iterations
        if self._iterations > 0:
            self.skip_batches = 0  # the checkpointed position only applies to the resumed epoch
        self.stream.set_epoch(self.epoch)
        self._iterations += 1

    def producing_workers(self, num_workers: int) -> int:
        # HF gives each DataLoader worker whole shards; workers beyond n_shards get none.
        return max(1, min(num_workers, self.stream.num_shards))

    def __iter__(self):
        info = get_worker_info()
        num_workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        skip = _batches_made_by_worker(self.skip_batches, self.producing_workers(num_workers), worker) * self.batch_size
        for text in iter_texts(self.stream, self.text_field):
            for window in document_windows(self.encoder.encode_batch([text])[0], self.seq_len):
                if skip:
                    skip -= 1
                    continue
                yield window_to_row(window, self.seq_len, self.pad_id)


def _round_robin_from(batches, first: int, num_workers: int):
    """Reorder a DataLoader's worker round-robin (0, 1, .., W-1, 0, ..) to start at worker ``first``.

    A resumed run must continue with the worker whose turn was next, but a new DataLoader always
    starts at worker 0; holding back at most ``first`` batches restores the original order.
    """
    held = []
    for i, batch in enumerate(batches):
        if i % num_workers < first:
            held.append(batch)
            continue
        yield batch
        if i % num_workers == num_workers - 1:
            yield from held
            held.clear()
    yield from held


class StreamingLoader(PositionedDataLoader):
    """Tells its dataset when a new epoch's iterator starts, and restores the worker order on resume."""

    def __iter__(self):
        dataset: StreamingTextWindows = self.dataset
        dataset.on_new_iterator()
        batches = super().__iter__()
        producing = dataset.producing_workers(self.num_workers) if self.num_workers > 0 else 1
        first = dataset.skip_batches % producing
        return _round_robin_from(batches, first, producing) if first else batches
