#!/usr/bin/env python3
"""What matters in k8s/ for the demo, checked offline: the seed's file names,
kustomization listing every manifest, namespace, images and pull policy,
ports and protocols, probes, and the env wiring that gives each pod its
identity. (Schema validation is `kubernetes-validate --strict`, run by
.ci/run beside this.) Ends with "N passed, M failed"."""
import os
import sys

import yaml

K8S = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "k8s")
SEED_FILES = ["namespace.yaml", "controller-deployment.yaml", "controller-service.yaml"] + [
    f"worker{i}-{kind}.yaml" for i in range(1, 5) for kind in ("deployment", "service")
]
results = []


def load(name):
    with open(os.path.join(K8S, name)) as f:
        return yaml.safe_load(f)


def check(name):
    def wrap(fn):
        try:
            fn()
            results.append(None)
            print(f"ok   {name}")
        except AssertionError as e:
            results.append(e)
            print(f"FAIL {name}: {e}")
        return fn

    return wrap


def container(deployment):
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, containers
    return containers[0]


def ports(spec_ports):
    return sorted((p["containerPort"] if "containerPort" in p else p["port"], p.get("protocol", "TCP")) for p in spec_ports)


@check("the seed's file names exist, and kustomization lists every manifest")
def _():
    present = sorted(f for f in os.listdir(K8S) if f.endswith(".yaml") and f != "kustomization.yaml")
    for f in SEED_FILES:
        assert f in present, f"{f} missing"
    listed = load("kustomization.yaml")["resources"]
    assert sorted(listed) == present, f"kustomization lists {listed}, folder has {present}"
    assert listed[0] == "namespace.yaml", "the namespace must come first"


@check("everything lives in namespace kv-system")
def _():
    assert load("namespace.yaml")["metadata"]["name"] == "kv-system"
    for f in SEED_FILES[1:] + ["hpa.yaml"]:
        assert load(f)["metadata"]["namespace"] == "kv-system", f


@check("images are the demo's, never pulled (minikube docker-env)")
def _():
    for f, image in [("controller-deployment.yaml", "distributed-kv-controller:latest")] + [
        (f"worker{i}-deployment.yaml", "distributed-kv-worker:latest") for i in range(1, 5)
    ]:
        c = container(load(f))
        assert c["image"] == image, (f, c["image"])
        assert c["imagePullPolicy"] == "Never", f


@check("the controller takes HTTP on TCP 8000 and heartbeats on UDP 8000, pod and Service")
def _():
    want = [(8000, "TCP"), (8000, "UDP")]
    assert ports(container(load("controller-deployment.yaml"))["ports"]) == want
    service = load("controller-service.yaml")
    assert service["metadata"]["name"] == "controller"
    assert ports(service["spec"]["ports"]) == want
    assert all(p["targetPort"] == 8000 for p in service["spec"]["ports"])
    assert load("controller-deployment.yaml")["spec"]["strategy"]["type"] == "Recreate"


@check("each worker Service selects its own Deployment's pods on 8001 (HTTP) and 8002 (wire)")
def _():
    for i in range(1, 5):
        d, s = load(f"worker{i}-deployment.yaml"), load(f"worker{i}-service.yaml")
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert s["spec"]["selector"].items() <= labels.items(), f"worker{i}-service selects {s['spec']['selector']}"
        assert s["spec"]["selector"].get("worker") == f"worker{i}", "a Service must not select other workers' pods"
        assert ports(container(d)["ports"]) == [(8001, "TCP"), (8002, "TCP")]
        assert ports(s["spec"]["ports"]) == [(8001, "TCP"), (8002, "TCP")]


@check("probes hit the HTTP port (workers' readiness /readyz); termination is graceful; resources are bounded")
def _():
    for f, port in [("controller-deployment.yaml", 8000)] + [(f"worker{i}-deployment.yaml", 8001) for i in range(1, 5)]:
        d = load(f)
        c = container(d)
        named = {p["name"]: p["containerPort"] for p in c["ports"]}
        for probe in ("readinessProbe", "livenessProbe"):
            get = c[probe]["httpGet"]
            want = "/readyz" if probe == "readinessProbe" and f.startswith("worker") else "/healthz"
            assert get["path"] == want, (f, probe, get["path"])
            assert named.get(get["port"], get["port"]) == port, (f, probe, get["port"])
        assert d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 5, f
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= c["resources"][kind].keys(), (f, kind)
        assert d["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True, f


@check("workers take their id from the pod name and advertise the pod IP; they find the controller Service")
def _():
    for i in range(1, 5):
        env = {e["name"]: e for e in container(load(f"worker{i}-deployment.yaml"))["env"]}
        assert env["KV_NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert env["KV_ADVERTISE_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        url = env["KV_CONTROLLER"]["value"]
        assert url.startswith("http://controller") and url.endswith(":8000"), url
        assert env["KV_LISTEN"]["value"].endswith(":8001") and env["KV_WIRE_LISTEN"]["value"].endswith(":8002")


@check("every pod reads the cluster secret from the kv-cluster-secret Secret, mounted read-only")
def _():
    for f in ["controller-deployment.yaml"] + [f"worker{i}-deployment.yaml" for i in range(1, 5)]:
        pod = load(f)["spec"]["template"]["spec"]
        c = container(load(f))
        env = {e["name"]: e.get("value") for e in c["env"]}
        path = env.get("KV_CLUSTER_SECRET_FILE")
        assert path, f"{f}: no KV_CLUSTER_SECRET_FILE"
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        mount = mounts["cluster-secret"]
        assert mount.get("readOnly") is True, f
        secret = volumes["cluster-secret"]["secret"]
        assert secret["secretName"] == "kv-cluster-secret", f
        files = {os.path.join(mount["mountPath"], i["path"]): i["key"] for i in secret["items"]}
        assert files.get(path) == "secret", f"{f}: {path} is not the Secret's key 'secret' ({files})"
        # Readable by the pod's user: its group owns the file.
        assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"], f
        assert secret["defaultMode"] & 0o040, f


@check("the HPA example scales a worker Deployment on CPU, down one pod at a time after a quiet window")
def _():
    hpa = load("hpa.yaml")
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    assert hpa["spec"]["scaleTargetRef"]["name"] in {f"worker{i}" for i in range(1, 5)}
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    down = hpa["spec"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 60, down
    assert down["policies"] and all(p["type"] == "Pods" and p["value"] == 1 for p in down["policies"]), down


def drain_timeout_s(c):
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    value = env.get("KV_DRAIN_TIMEOUT", "60s")
    assert value.endswith("s") and value[:-1].isdigit(), f"KV_DRAIN_TIMEOUT {value!r}: write it in whole seconds"
    return int(value[:-1])


@check("worker rollouts surge one ready pod before stopping one, and never kill a worker that is still handing its keys over")
def _():
    for i in range(1, 5):
        d = load(f"worker{i}-deployment.yaml")
        strategy = d["spec"]["strategy"]
        assert strategy["type"] == "RollingUpdate", strategy
        assert strategy["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}, strategy
        assert d["spec"]["minReadySeconds"] >= 1, d["spec"].get("minReadySeconds")
        grace = d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > drain_timeout_s(container(d)), f"worker{i}: terminationGracePeriodSeconds {grace} is not above the drain timeout"


@check("a PodDisruptionBudget lets voluntary disruptions take one worker at a time")
def _():
    pdb = load("worker-pdb.yaml")
    assert pdb["kind"] == "PodDisruptionBudget" and pdb["metadata"]["namespace"] == "kv-system"
    assert pdb["spec"]["maxUnavailable"] == 1, pdb["spec"]
    assert pdb["spec"]["selector"]["matchLabels"] == {"app": "worker"}
    for i in range(1, 5):
        labels = load(f"worker{i}-deployment.yaml")["spec"]["template"]["metadata"]["labels"]
        assert labels.get("app") == "worker", f"worker{i} pods are not covered by the PDB"


@check("compose gives workers a stop grace period above their drain timeout")
def _():
    with open(os.path.join(os.path.dirname(K8S), "compose.yaml")) as f:
        compose = yaml.safe_load(f)
    anchor = compose["x-worker"]
    grace = anchor["stop_grace_period"]
    assert grace.endswith("s") and int(grace[:-1]) > 60, grace
    for name, service in compose["services"].items():
        if name.startswith("worker"):
            assert service.get("stop_grace_period", grace) == grace, name


def data_dir_on(c, pod, kind):
    """The volume of the pod's KV_DATA_DIR mount; asserts there is one."""
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    path = env.get("KV_DATA_DIR")
    assert path, "no KV_DATA_DIR: the worker keeps its data in memory"
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
    assert path in mounts, f"KV_DATA_DIR {path} is not a mounted volume (the root filesystem is read-only)"
    return mounts[path]


@check("Deployment workers keep their data in KV_DATA_DIR on an emptyDir (a crashed container restarts with it)")
def _():
    for i in range(1, 5):
        d = load(f"worker{i}-deployment.yaml")
        pod = d["spec"]["template"]["spec"]
        name = data_dir_on(container(d), pod, "Deployment")
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[name], f"worker{i}: {volumes[name]}"


DURABLE = os.path.join(K8S, "durable")


def load_durable(name):
    with open(os.path.join(DURABLE, name)) as f:
        return yaml.safe_load(f)


def key(doc):
    return (doc["kind"], doc["metadata"]["name"])


@check("k8s/durable/ is k8s/ with the worker Deployments, their Services and the HPA replaced by a StatefulSet")
def _():
    k = load_durable("kustomization.yaml")
    assert "../" in k["resources"], k["resources"]
    own = [r for r in k["resources"] if r != "../"]
    present = sorted(f for f in os.listdir(DURABLE) if f.endswith(".yaml") and f != "kustomization.yaml")
    assert sorted(own) == present, f"lists {own}, folder has {present}"
    base = {key(load(f)): load(f) for f in load("kustomization.yaml")["resources"]}
    deleted = set()
    for p in k["patches"]:
        doc = yaml.safe_load(p["patch"])
        assert doc["$patch"] == "delete", doc
        assert doc["metadata"]["namespace"] == "kv-system", doc
        assert key(doc) in base, f"the patch deletes {key(doc)}, which k8s/ does not have"
        assert base[key(doc)]["apiVersion"] == doc["apiVersion"], doc
        deleted.add(key(doc))
    want = {("Deployment", f"worker{i}") for i in range(1, 5)} | {("Service", f"worker{i}") for i in range(1, 5)}
    want.add(key(load("hpa.yaml")))
    assert deleted == want, f"deletes {sorted(deleted)}, not {sorted(want)}"
    result = {n: d for n, d in base.items() if n not in deleted}
    for f in own:
        result[key(load_durable(f))] = load_durable(f)
    pdb = key(load("worker-pdb.yaml"))
    expected = {("Namespace", "kv-system"), ("Deployment", "controller"), ("Service", "controller"), pdb,
                ("StatefulSet", "worker"), ("Service", "worker")}
    assert set(result) == expected, sorted(result)


@check("the StatefulSet: stable ids from pod names, a claimed volume per pod at KV_DATA_DIR, a headless Service, the lifecycle settings")
def _():
    sts, svc = load_durable("worker-statefulset.yaml"), load_durable("worker-service.yaml")
    assert sts["kind"] == "StatefulSet" and sts["metadata"]["namespace"] == "kv-system"
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"] and svc["spec"]["clusterIP"] == "None"
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    assert labels.get("app") == "worker", "the PDB must cover the StatefulSet's pods"
    c = container(sts)
    pod = sts["spec"]["template"]["spec"]
    assert c["image"] == "distributed-kv-worker:latest" and c["imagePullPolicy"] == "Never"
    env = {e["name"]: e for e in c["env"]}
    assert env["KV_NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["KV_ADVERTISE_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    name = data_dir_on(c, pod, "StatefulSet")
    claims = {t["metadata"]["name"]: t for t in sts["spec"]["volumeClaimTemplates"]}
    assert name in claims, f"the data dir's volume {name} is not a volumeClaimTemplate"
    assert claims[name]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["terminationGracePeriodSeconds"] > drain_timeout_s(c)
    assert sts["spec"]["updateStrategy"]["type"] == "RollingUpdate" and sts["spec"]["minReadySeconds"] >= 1
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"], "the volume must be writable by the pod's group"
    secret = {v["name"]: v for v in pod["volumes"]}["cluster-secret"]["secret"]
    assert secret["secretName"] == "kv-cluster-secret"
    assert ports(c["ports"]) == [(8001, "TCP"), (8002, "TCP")]


@check("compose gives each worker a named volume at its KV_DATA_DIR")
def _():
    with open(os.path.join(os.path.dirname(K8S), "compose.yaml")) as f:
        compose = yaml.safe_load(f)
    for i in range(1, 5):
        service = compose["services"][f"worker{i}"]
        path = service["environment"].get("KV_DATA_DIR")
        assert path, f"worker{i}: no KV_DATA_DIR"
        volumes = dict(v.split(":", 1)[::-1] for v in service.get("volumes", []))
        assert path in volumes, f"worker{i}: {path} is not a volume"
        assert volumes[path] in (compose.get("volumes") or {}), f"worker{i}: {volumes[path]} is not a named volume"


failed = len([e for e in results if e])
print(f"k8s manifests: {len(results) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
