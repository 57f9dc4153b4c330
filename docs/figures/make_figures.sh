#!/bin/sh
# Regenerates the example figures of docs/hubness.md and the README from the shared Multi30k data
# (../shared/data/multi30k-de2en-e5.h5; see shared/README.md), through the CLI only.
#   docs/figures/make_figures.sh [DATA.h5] [WORKDIR]
# WORKDIR (default: a temporary directory) keeps the banks, the probe and the normalised scores.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
D=${1:-$here/../../../shared/data/multi30k-de2en-e5.h5}
work=${2:-$(mktemp -d)}
cd "$work"
qbnorm build-bank "$D::/train_queries" -o qbank.h5 --strategy all --force -q
qbnorm build-bank "$D::/train_gallery" -o gbank.h5 --strategy all --force -q
# one probe for every method: β = 20 (QB-Norm's IS and DIS) and 100 (Sinkhorn, as tune picks it)
qbnorm probe --bank qbank.h5 --gallery "$D::/gallery" --gallery-bank gbank.h5 --beta 20 --beta 100 --k 1 \
    --sinkhorn -o probe.h5 --force -q
for method in none is dis csls nnn sn dbsn; do
    name=$method; [ "$method" = none ] && name=raw
    beta=20; case $method in sn|dbsn) beta=100;; esac
    qbnorm normalise --queries "$D::/queries" --gallery "$D::/gallery" --probe probe.h5 --method "$method" \
        --beta "$beta" -o "$name.h5" --force -q
done
runs="raw.h5 is.h5 dis.h5 csls.h5 nnn.h5 sn.h5 dbsn.h5"
# shellcheck disable=SC2086
qbnorm hubness $runs --k 10 --plot "$here/hubness.png" --force -q
# shellcheck disable=SC2086
qbnorm evaluate $runs --gt "$D::/gt" --plot "$here/recall.png" --force -q
qbnorm tune --queries "$D::/val_queries" --gallery "$D::/val_gallery" --gt "$D::/val_gt" --bank qbank.h5 \
    --gallery-bank gbank.h5 -o params.json --plot "$here/tune.png" --force -q --progress lines
echo "figures in $here; data in $work"
