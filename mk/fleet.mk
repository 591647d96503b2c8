# The autoscaling fleet harness (fleet/, docs/AUTOSCALING.md): real server processes on 127.0.0.x
# behind dnsmasq, a real Prometheus, the Kubernetes HPA algorithm reading the chart's rendered HPA.
#   make autoscale                  the standard scenario (real time, about 35 minutes)
#   make autoscale SCENARIO=FILE    any other scenario
#   make autoscale SCENARIO=fleet/scenarios/step.yaml AUTOSCALE_ARGS="--set autoscaling.targetLoad=1.0"
# Writes bench/results/autoscale/report.json and report.png (AUTOSCALE_OUT=DIR to change).
SCENARIO ?= fleet/scenarios/standard.yaml
AUTOSCALE_OUT ?= bench/results/autoscale

.PHONY: autoscale
autoscale: install helm debian-tools
	$(PY) -m fleet.run --scenario $(SCENARIO) --out $(AUTOSCALE_OUT) $(AUTOSCALE_ARGS)
