#!/usr/bin/env bash
# Regenerate docs/screenshots/*.png with `sol gui --screenshot` under Xvfb.
#   MODEL=path/to/model docs/screenshots/make_screenshots.sh
# (apt-get install -y xvfb first). SOL_HOME decides which models and conversations appear.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${MODEL:-resources/models/starter}
for panel in chat models tokens attention training plugins; do
  xvfb-run -a -s "-screen 0 1400x900x24" sol gui --panel "$panel" --model "$MODEL" \
    --screenshot "docs/screenshots/$panel.png"
done
