# Drops every <backingStore>...</backingStore> element (at any depth) and every <backingStore/>
# from a libvirt domain XML (one element per line, as libvirt formats it). Used on the XML embedded
# in a memory file before restoring onto a NEW overlay: libvirt honours a <backingStore> given in
# the input XML instead of probing the qcow2 chain, so a stale one silently opens the wrong chain.
/<backingStore\/>/ && depth == 0 { next }
/<backingStore[ >]/ { depth++; next }
depth > 0 && /<\/backingStore>/ { depth--; next }
depth > 0 { next }
{ print }
