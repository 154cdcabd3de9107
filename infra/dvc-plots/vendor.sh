#!/usr/bin/env bash
# Writes .dvc/plots/offline.html: DVC's page template for `dvc plots show` (its documented
# `plots.html_template` setting, in .dvc/config) with Vega, Vega-Lite and Vega-Embed inlined.
# DVC's own page loads these from a CDN, so offline its Vega plots are blank frames; with them
# inlined the page draws every plot with no network. The versions are the ones DVC's page
# names (dvc_render.vega.VegaRenderer.SCRIPTS); the files are the packages' minified builds
# from the npm registry, each under the BSD-3-Clause licence in .dvc/plots/LICENSES.md.
# The template leaves out DVC's `{scripts}` placeholder, which DVC fills with the CDN tags.
#
#   infra/dvc-plots/vendor.sh          # needs npm (the npm registry), rewrites both files
set -euo pipefail
cd "$(dirname "$0")/../.."
packages=(vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "${packages[@]}" >/dev/null)
out=.dvc/plots
mkdir -p "$out"
{
  printf '<!DOCTYPE html>\n<html>\n<head>\n    {refresh_tag}\n    <title>DVC Plot</title>\n'
  printf '    <!-- Written by infra/dvc-plots/vendor.sh: %s, inlined from npm (BSD-3-Clause, see LICENSES.md) so that the page draws offline. -->\n' "${packages[*]}"
  for spec in "${packages[@]}"; do
    name=${spec%@*}
    mkdir -p "$work/$name"
    tar xzf "$work/$name-${spec#*@}.tgz" -C "$work/$name"
    printf '    <script type="text/javascript">/* %s: build/%s.min.js */\n' "$spec" "$name"
    cat "$work/$name/package/build/$name.min.js"
    printf '\n    </script>\n'
  done
  printf '    <style>\n        table {\n            border-spacing: 15px;\n        }\n    </style>\n'
  printf '</head>\n<body>\n    {plot_divs}\n</body>\n</html>\n'
} > "$out/offline.html.tmp"
{
  printf '# Licences of the files inlined in offline.html\n\n'
  printf 'offline.html inlines the minified builds of these npm packages, unmodified:\n'
  printf '%s\n' "${packages[@]/#/- }"
  for spec in "${packages[@]}"; do
    name=${spec%@*}
    printf '\n## %s\n\n```\n' "$spec"
    cat "$work/$name/package/LICENSE"
    printf '```\n'
  done
} > "$out/LICENSES.md.tmp"
mv "$out/offline.html.tmp" "$out/offline.html"
mv "$out/LICENSES.md.tmp" "$out/LICENSES.md"
echo "wrote $out/offline.html ($(wc -c < "$out/offline.html") bytes) and $out/LICENSES.md"
