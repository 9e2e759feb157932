"""datatrove 0.10.1's 4-stage local MinHash over a corpus folder: the peer of ``benchmarks/scale.py``.

Run as a child process (``python benchmarks/peers/datatrove_minhash.py INPUT_FOLDER WORK TASKS``) so the
parent measures its wall time and peak RSS the same way as ours. Stages, as datatrove's own example
(examples/minhash_deduplication.py): signatures -> buckets -> cluster -> filter, each on
``LocalPipelineExecutor`` with ``TASKS`` tasks and workers; default MinhashConfig (14 buckets x 8
hashes, word 5-grams). Prints the kept document count.
"""

from __future__ import annotations

import sys


def main(inputs: str, work: str, tasks: int) -> int:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    config = MinhashConfig()
    reader = JsonlReader(inputs, glob_pattern="*.jsonl.gz")
    stages = [
        [reader, MinhashDedupSignature(output_folder=f"{work}/signatures", config=config)],
        [MinhashDedupBuckets(input_folder=f"{work}/signatures", output_folder=f"{work}/buckets", config=config)],
        [MinhashDedupCluster(input_folder=f"{work}/buckets", output_folder=f"{work}/remove_ids", config=config)],
        [reader, MinhashDedupFilter(input_folder=f"{work}/remove_ids"), JsonlWriter(f"{work}/out")],
    ]
    for i, pipeline in enumerate(stages):
        # buckets run one task per bucket; the cluster step is one task by design
        n = config.num_buckets if i == 1 else (1 if i == 2 else tasks)
        LocalPipelineExecutor(pipeline=pipeline, tasks=n, workers=min(n, tasks),
                              logging_dir=f"{work}/logs/{i}", skip_completed=False).run()
    import gzip
    import json
    import os

    kept = 0
    for name in os.listdir(f"{work}/out"):
        with gzip.open(f"{work}/out/{name}", "rt") as fh:
            kept += sum(1 for line in fh if json.loads(line))
    print(f"KEPT {kept}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
