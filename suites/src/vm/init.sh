#!/bin/busybox sh
# trackcheck lane init (written by `trackcheck vm`): mount, load KVM's modules, run the
# trackcheck commands, send the reports back over the console as base64 of a tar.gz.
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp; mount -t tmpfs run /run
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
. /lane/settings
# The lane's kernel is the suite's own: trials may change its settings (and restore them).
export PATH=/bin TRACKCHECK_GOLDEN=/lane/golden/matrix HOME=/tmp LD_LIBRARY_PATH TRACKCHECK_OWN_HOST=1
mkdir -p /lane/out
echo "=== lane: booted $(uname -r), $(nproc) CPUs, $(grep MemTotal /proc/meminfo | tr -s ' '), uptime $(cut -d' ' -f1 /proc/uptime) s"
# Modules, dependencies first (the host read their .modinfo): "file param=value ...".
while read -r file params; do
  [ -n "$file" ] || continue
  if insmod "/lane/modules/$file" $params; then
    echo "=== lane: loaded $file $params"
  else
    echo "=== lane: insmod $file failed"
  fi
done < /lane/modules.list
# reclaim-file's disk (see DISK_MODULES in build.rs): ext2 on a RAM block device at /var/tmp.
if [ -b /dev/ram0 ] && mke2fs -F /dev/ram0 >/dev/null 2>&1 \
  && { mount -t ext4 /dev/ram0 /var/tmp 2>/dev/null || mount -t ext2 /dev/ram0 /var/tmp; }; then
  echo "=== lane: /var/tmp: ext2 on /dev/ram0 ($(grep ' /var/tmp ' /proc/mounts | cut -d' ' -f3))"
else
  echo "=== lane: /var/tmp: no ext2 RAM disk (brd or ext4 missing, or mount failed): reclaim-file skips"
fi
# run NAME CMD...: output to the console and /lane/out/NAME.log, status to /lane/out/NAME.rc
run() {
  name=$1; shift
  start=$(date +%s)
  echo "=== lane: $name: $*"
  { TRACKCHECK_TRACE=/lane/out/$name.trace "$@" 2>&1; echo $? > /lane/out/$name.rc; } | tee /lane/out/$name.log
  echo "=== lane: $name: exit $(cat /lane/out/$name.rc) after $(( $(date +%s) - start )) s"
}
if [ -e /dev/kvm ]; then
  . /lane/commands
  if [ -n "$BLESS" ]; then cp -r /lane/golden/matrix /lane/out/golden; fi
else
  echo "=== lane: no /dev/kvm"
fi
dmesg > /lane/out/dmesg.txt
echo "=== TRACKCHECK-OUT BEGIN"
tar -C /lane -czf - out | base64
echo "=== TRACKCHECK-OUT END"
poweroff -f
