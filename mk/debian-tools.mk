# Debian's Prometheus (prometheus, promtool) and dnsmasq, unpacked into .tools/debian/ without installing
# them (no service starts, no system file changes): the fleet harness (fleet/, tests/fleet/) runs a
# real Prometheus and a real DNS server, and the alert rules are checked with promtool.
# See mk/debian-tools.sh for how (apt-get download + dpkg -x, with dnsmasq's missing shared libraries).
DEBIAN_TOOLS_DIR := $(CURDIR)/.tools/debian
# The stamp names the script's checksum's prefix: editing the script re-unpacks, re-running does nothing.
DEBIAN_TOOLS_STAMP := $(CURDIR)/.tools/.debian-tools-$(shell sha256sum mk/debian-tools.sh | cut -c1-12).stamp

# Tests and benchmarks find the binaries through these (tests skip nothing: `make test` installs them).
export SDXL_PROMETHEUS ?= $(DEBIAN_TOOLS_DIR)/bin/prometheus
export SDXL_PROMTOOL ?= $(DEBIAN_TOOLS_DIR)/bin/promtool
export SDXL_DNSMASQ ?= $(DEBIAN_TOOLS_DIR)/bin/dnsmasq

.PHONY: debian-tools
debian-tools: $(DEBIAN_TOOLS_STAMP)

$(DEBIAN_TOOLS_STAMP): mk/debian-tools.sh
	bash mk/debian-tools.sh $(DEBIAN_TOOLS_DIR)
	rm -f $(CURDIR)/.tools/.debian-tools-*.stamp && touch $@

TEST_PREREQS += debian-tools
