#!/usr/bin/env bash
# Regenerate docs/screenshots/*.png with `sol gui --screenshot` under Xvfb, in a fresh SOL_HOME
# that holds one short pretraining run (prepare_home.py) and the starter's calculator chat.
#   docs/screenshots/make_screenshots.sh [CORPUS]      (apt-get install -y xvfb first)
set -euo pipefail
cd "$(dirname "$0")/../.."
CORPUS=${1:-../shared/data/tinyshakespeare.txt}
export SOL_HOME=${SOL_HOME:-$(mktemp -d)}
xvfb-run -a -s "-screen 0 1400x900x24" python docs/screenshots/prepare_home.py "$CORPUS"
xvfb-run -a -s "-screen 0 1400x900x24" python docs/screenshots/make_chat.py resources/models/starter
xvfb-run -a -s "-screen 0 1400x900x24" python docs/screenshots/make_compare.py resources/models/starter resources/models/words
for panel in models tokens attention training plugins; do
  xvfb-run -a -s "-screen 0 1400x900x24" sol gui --panel "$panel" --model resources/models/starter \
    --screenshot "docs/screenshots/$panel.png"
done
# The book's §2.6/§2.9 views and the logit lens, on the word-level model (its tokens are words).
for panel in embeddings score lens; do
  xvfb-run -a -s "-screen 0 1400x900x24" sol gui --panel "$panel" --model resources/models/words \
    --screenshot "docs/screenshots/$panel.png"
done
echo "SOL_HOME was $SOL_HOME"
