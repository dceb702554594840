# Sourced by the compare scripts: a busybox image, loaded into caisson's store, and an OCI
# bundle (for crun and runc) with the same root filesystem.
#   busybox_image_and_bundle WORK CAISSON ROOT "APPLET..." ARGS_JSON
# makes WORK/oci (the layout), loads it into ROOT as localhost/oci:latest, and WORK/bundle with
# process.args = ARGS_JSON (e.g. '["/bin/true"]') and no terminal.
busybox_image_and_bundle() {
  local work=$1 caisson=$2 root=$3 applets=$4 args=$5 a
  umoci init --layout "$work/oci" >/dev/null
  umoci new --image "$work/oci:latest" >/dev/null
  umoci unpack --image "$work/oci:latest" "$work/b" >/dev/null
  mkdir -p "$work/b/rootfs/bin"; cp /bin/busybox "$work/b/rootfs/bin/"
  for a in $applets; do ln -s busybox "$work/b/rootfs/bin/$a"; done
  umoci repack --image "$work/oci:latest" "$work/b" >/dev/null; rm -rf "$work/b"
  "$caisson" --root "$root" load -q -i "$work/oci:latest" >/dev/null
  mkdir -p "$work/bundle/rootfs"
  umoci unpack --image "$work/oci:latest" "$work/unpacked" >/dev/null
  cp -a "$work/unpacked/rootfs/." "$work/bundle/rootfs/"
  (cd "$work/bundle" && runc spec)
  jq --argjson args "$args" '.process.terminal=false | .process.args=$args' \
    "$work/bundle/config.json" > "$work/bundle/c.json"
  mv "$work/bundle/c.json" "$work/bundle/config.json"
}
