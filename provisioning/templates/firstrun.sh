#!/bin/sh
# First boot of a flashed Raspberry Pi (written by `dccl deploy flash-pi`): install the DCCL agent
# from the board bundle on the boot partition, then take this hook off the kernel command line.
set -eu
for BOOT in /boot/firmware /boot; do [ -d "$BOOT/dccl" ] && break; done
LOG=/var/log/dccl-firstrun.log
if sh "$BOOT/dccl/install.sh" >>"$LOG" 2>&1; then
  echo "dccl firstrun: installed" >>"$LOG"
else
  echo "dccl firstrun: install failed (see above); the next boot will not retry" >>"$LOG"
fi
# remove the secrets from the (world-readable FAT) boot partition once they are installed
rm -f "$BOOT/dccl/etc/dccl/agent.env"
sed -i 's| systemd.run=[^ ]*dccl-firstrun.sh[^ ]*||; s| systemd.run_success_action=reboot||; s| systemd.unit=kernel-command-line.target||' \
  "$BOOT/cmdline.txt"
rm -f "$BOOT/dccl-firstrun.sh"
exit 0
