# Checks what disk-write.sh left on the root disk.
line=
[ -f /data/hello.txt ] && read -r line </data/hello.txt
if [ "$line" = ember-disk-test ] && md5sum -c /data/blob.md5 >/dev/null 2>&1; then
	echo "EMBER-DISK present"
else
	echo "EMBER-DISK missing"
fi
