#!/bin/bash
# Throughput of `xmodal ingest` on N real Flickr8k photos (train images 3000..3000+N) against a
# fresh embedded `xmodal serve` (shipped model, default settings, fsync on); then a re-run,
# which skips everything. Usage: N=200 bench/ingest_cli.sh (run with the venv on PATH).
set -e
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
DATA=${XMODAL_SHARED_DATA:-../shared/data}
N=${N:-200}
W=$(mktemp -d); rm -rf $W; mkdir -p $W/photos
python - <<PY
import json, shutil
rows=[json.loads(l) for l in open("$DATA/flickr8k/captions.jsonl")]
test=[r for r in rows if r["split"]=="train"][3000:3000+$N]
for r in test: shutil.copy("$DATA/flickr8k/images/"+r["image"], "$W/photos/"+r["image"])
PY
XMODAL_INDEX__FSYNC=true XMODAL_LOG_JSON=true python -m service.cli serve --port 8799 --data-dir $W/data > $W/serve.log 2>&1 &
PID=$!
until curl -sf http://127.0.0.1:8799/readyz >/dev/null; do sleep 0.5; done
T0=$(date +%s.%N)
python -m service.cli ingest $W/photos --url http://127.0.0.1:8799 --no-progress --json > $W/first.json || true
T1=$(date +%s.%N)
python -m service.cli ingest $W/photos --url http://127.0.0.1:8799 --no-progress --json > $W/second.json || true
T2=$(date +%s.%N)
kill $PID; wait $PID || true
trap "rm -rf $W" EXIT
python - <<PY
import json
a=json.load(open("$W/first.json")); b=json.load(open("$W/second.json"))
t1=$T1-$T0; t2=$T2-$T1
print(json.dumps({"photos": $N, "first_run_s": round(t1,1), "indexed": a["indexed"], "items_per_s": round(a["indexed"]/t1,1),
 "second_run_s": round(t2,1), "skipped": b["skipped"], "skip_items_per_s": round(b["skipped"]/t2,1)}))
PY
