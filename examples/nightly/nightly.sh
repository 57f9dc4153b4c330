#!/usr/bin/env bash
# A nightly qbnorm job for cron: update yesterday's probe with what changed today, gate on quality
# and on hubs, re-export the index, and only then promote today's files. A failed step leaves
# yesterday's files in place (exit 3: bad input, e.g. a gallery file out of step with the probe;
# exit 4: a gate failed).
#
#   STATE/gallery.npy, bank.npy, probe.h5   what yesterday's probe was made from, and the probe
#   STATE/today/new_items.npy               items added today           (each of the three optional)
#   STATE/today/gone.npy                    old gallery rows removed today (1-D integers)
#   STATE/today/logged_queries.npy          yesterday's logged queries: the bank's new rows
#   STATE/eval/queries.npy, gt.npy          a labelled query set, gt against today's final gallery
#
# crontab:  15 2 * * *  /path/to/nightly.sh /srv/retrieval >> /var/log/qbnorm-nightly.log 2>&1
set -euo pipefail
S=${1:?usage: nightly.sh STATE_DIR}
METHOD=${METHOD:-dis}
cd "$S"
changes=()
[[ -e today/new_items.npy ]] && changes+=(--add-gallery today/new_items.npy)
[[ -e today/gone.npy ]] && changes+=(--remove-gallery today/gone.npy)
[[ -e today/logged_queries.npy ]] && changes+=(--add-bank today/logged_queries.npy)
if (( ${#changes[@]} == 0 )); then echo "qbnorm nightly: nothing changed"; exit 0; fi
rm -rf next && mkdir next

# 1. today's probe from yesterday's: costs the new scores only (new bank × gallery + bank × new items)
qbnorm probe --update probe.h5 --bank bank.npy --gallery gallery.npy "${changes[@]}" -o next/probe.h5 --quiet

# 2. today's gallery and bank files, in the order the update used: removals first, additions after
python3 - <<'PY'
import os
import numpy as np
gallery, bank = np.load("gallery.npy"), np.load("bank.npy")
if os.path.exists("today/gone.npy"):
    gallery = np.delete(gallery, np.unique(np.load("today/gone.npy")), axis=0)
if os.path.exists("today/new_items.npy"):
    gallery = np.concatenate([gallery, np.load("today/new_items.npy")])
if os.path.exists("today/logged_queries.npy"):
    bank = np.concatenate([bank, np.load("today/logged_queries.npy")])
np.save("next/gallery.npy", gallery)
np.save("next/bank.npy", bank)
PY

# 3. gates: quality on the labelled queries (exit 4 below R@1 = MIN_R1), no item a hub (exit 4 above 6)
qbnorm normalise --queries eval/queries.npy --gallery next/gallery.npy --probe next/probe.h5 \
    --method "$METHOD" --top-k 10 -o next/eval.h5 --quiet
qbnorm evaluate next/eval.h5 --gt eval/gt.npy --fail-under "R@1=${MIN_R1:-20}" --quiet
qbnorm hubs next/probe.h5 --fail-over "${MAX_HUB:-6}" --quiet

# 4. the index: the bank grew, so every item's extra column changed: export every item
#    (with a fixed bank the kept items' offsets stay the same; see README, "Nightly jobs")
qbnorm export --probe next/probe.h5 --gallery next/gallery.npy --method "$METHOD" --format npy -o next/index --quiet

# 5. promote today's files
for f in probe.h5 gallery.npy bank.npy; do mv "next/$f" "$f"; done
rm -rf index && mv next/index index
mkdir -p done && mv today "done/$(date +%Y-%m-%dT%H%M%S)" && mkdir today
echo "qbnorm nightly: $(python3 -c 'import numpy as np; print(len(np.load("gallery.npy")))') items, probe and index updated"
