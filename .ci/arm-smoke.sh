#!/bin/busybox sh
# /init of the aarch64 VM that .ci/arm boots: the end-to-end smoke test of
# the aarch64 binaries, then power off. Prints "LOGBOOK-ARM-SMOKE: PASS"
# only when every check held; .ci/arm looks for that line.
#
# What it proves on aarch64: logbookd opens its sockets, takes records over
# ingest.sock (JSON lines, from `logbook log`) inside and outside a session
# while its hub is down, keeps them, and syncs them once the hub is up
# (retrying until then); logbook-hub stores each record exactly once (by
# (device, seq)) and the session's artifact byte for byte (tus upload,
# SHA-256 checked by the hub); the CLI talks to both.
/bin/busybox --install -s /bin
export PATH=/bin HOME=/tmp
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mount -t tmpfs tmp /tmp
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up

finish() {
  echo "LOGBOOK-ARM-SMOKE: $1"
  sync
  poweroff -f
}
fail() {
  echo "smoke: FAILED: $*"
  for f in /tmp/hub.log /tmp/agent.log; do
    [ -f "$f" ] && { echo "--- $f (last 40 lines)"; tail -40 "$f"; }
  done
  finish FAIL
}
# Waits up to $1 seconds (in 0.2 s steps) for the command after it to succeed.
wait_until() {
  n=$(( $1 * 5 )); shift
  while ! "$@" >/dev/null 2>&1; do
    n=$(( n - 1 ))
    [ "$n" -gt 0 ] || return 1
    sleep 0.2
  done
}

echo "smoke: $(uname -m), $(nproc) cores, kernel $(uname -r)"
[ "$(uname -m)" = aarch64 ] || fail "not an aarch64 machine"

D=/tmp/lb
HUB=http://127.0.0.1:8470
N=500
mkdir -p $D/hub $D/agent $D/run
DEVICE=$(logbook-hub token create --data-dir $D/hub --org ci --project arm --device arm-robot) || fail "device token"
KEY=$(logbook-hub token create --data-dir $D/hub --org ci --project arm --operator) || fail "operator key"

# The agent first, its hub not up yet: it must keep what it takes and
# retry until the hub appears.
LOGBOOK_DEVICE_ID=arm-robot LOGBOOK_SYNC_HUB=$HUB LOGBOOK_SYNC_TOKEN=$DEVICE \
  LOGBOOK_SYNC_RETRY_MAX=2 LOGBOOK_ARTIFACTS_SETTLE_SECS=1 \
  logbookd --state-dir $D/agent --runtime-dir $D/run >/tmp/agent.log 2>&1 &
wait_until 60 test -S $D/run/api.sock || fail "logbookd opened no api.sock within 60 s"
wait_until 60 logbook --runtime-dir $D/run status || fail "logbookd does not answer"
echo "smoke: logbookd is up"

L="logbook --runtime-dir $D/run"
$L log --module smoke "before the session" || fail "logbook log outside a session"
SID=$($L session start --tag arm --package smoke@1) || fail "session start"
echo "smoke: session $SID"
seq 1 $N | sed 's/^/record /' | $L log --module smoke --level warn || fail "logbook log (stdin)"
ART=$D/agent/sessions/$SID/artifacts
[ -d "$ART" ] || fail "no artifact directory $ART"
dd if=/dev/urandom of=$D/map.part bs=1024 count=300 2>/dev/null
mv $D/map.part "$ART/map.bin"
$L session stop || fail "session stop"
$L flush || fail "flush"

logbook-hub serve --data-dir $D/hub --listen 127.0.0.1:8470 >/tmp/hub.log 2>&1 &
wait_until 60 wget -q -O /dev/null $HUB/healthz || fail "logbook-hub did not answer /healthz within 60 s"
echo "smoke: logbook-hub is up"

H="logbook --hub $HUB --key $KEY --org ci --project arm"
got() { $H logs --session "$SID" --json >$D/session.jsonl 2>$D/hub-cli.err && [ "$(wc -l <$D/session.jsonl)" -ge "$N" ]; }
wait_until 180 got || fail "the hub has $(wc -l <$D/session.jsonl) of $N session records after 180 s: $(cat $D/hub-cli.err)"
[ "$(wc -l <$D/session.jsonl)" -eq "$N" ] || fail "the hub has $(wc -l <$D/session.jsonl) session records, not $N"
[ "$(grep -o '"seq":[0-9]*' $D/session.jsonl | sort -u | wc -l)" -eq "$N" ] || fail "session records are not unique by seq"
for i in 1 250 $N; do grep -q "\"message\":\"record $i\"" $D/session.jsonl || fail "record $i missing at the hub"; done
grep -qi '"level":"warn"' $D/session.jsonl || fail "levels lost"
devgot() { $H logs --device arm-robot --json >$D/device.jsonl 2>&1 && grep -q '"message":"before the session"' $D/device.jsonl; }
wait_until 60 devgot || fail "the record outside the session is not at the hub: $(head -3 $D/device.jsonl)"
echo "smoke: the hub holds all $N session records once each, and the device record"

art() { $H artifacts --session "$SID" --download map.bin -o $D/map.hub >/dev/null 2>&1 && cmp -s "$ART/map.bin" $D/map.hub; }
wait_until 180 art || fail "the artifact is not at the hub byte for byte after 180 s: $($H artifacts --session "$SID" 2>&1)"
echo "smoke: the session's artifact is at the hub byte for byte"
$H sessions | grep -q "$SID" || fail "the hub does not list the session"

finish PASS
