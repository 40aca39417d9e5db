//! The deployment files (deploy/): what can be checked without Docker or Kubernetes.
//! compose.yaml and the Kubernetes manifests parse and agree with each other (replica count,
//! ports, the Secrets and keys the replicas use, the database URL), the kbs.toml in the
//! ConfigMap is a config the `kbs` binary accepts, and HAProxy accepts deploy/haproxy.cfg,
//! which is the one file both compose.yaml and the replica tests (tests/tests/replicas.rs)
//! run.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use serde_json::Value;
use tests::{HAPROXY_BACKENDS, haproxy_binary, haproxy_cfg, skip};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every document of a YAML file, as JSON values.
fn documents(path: &Path) -> Vec<Value> {
    use serde::Deserialize;
    let text = read(path);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

fn one(path: &Path) -> Value {
    let mut docs = documents(path);
    assert_eq!(docs.len(), 1, "{}", path.display());
    docs.remove(0)
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string at {pointer} in {v}"))
}

/// The manifest of `kind` named `name` among all the Kubernetes files.
fn manifest<'a>(all: &'a [Value], kind: &str, name: &str) -> &'a Value {
    all.iter()
        .find(|m| m["kind"] == kind && m["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/k8s"))
}

#[test]
fn compose_runs_three_replicas_behind_haproxy_with_the_one_haproxy_cfg() {
    let compose = one(&deploy().join("compose.yaml"));
    let services = compose["services"].as_object().expect("services");
    let replicas: Vec<&String> = services.keys().filter(|k| k.starts_with("kbs")).collect();
    assert_eq!(replicas.len(), HAPROXY_BACKENDS, "{replicas:?}");
    let haproxy = &services["haproxy"];
    for (i, name) in replicas.iter().enumerate() {
        let kbs = &services[name.as_str()];
        assert!(
            str_at(kbs, "/environment/KBS_STORAGE__DATABASE_URL").starts_with("postgres://"),
            "{name}"
        );
        assert_eq!(kbs["volumes"][0], "tether-keys:/var/lib/tether", "{name}");
        assert_eq!(
            kbs["command"],
            serde_json::json!(["--listen", "0.0.0.0:8080", "--data-dir", "/var/lib/tether"])
        );
        let check = kbs["healthcheck"]["test"].to_string();
        assert!(check.contains("/readyz"), "{name}: {check}");
        // HAProxy's backend i is this replica, on the port it listens on.
        assert_eq!(
            str_at(haproxy, &format!("/environment/TETHER_KBS_{}", i + 1)),
            format!("{name}:8080")
        );
        assert_eq!(
            haproxy["depends_on"][name.as_str()]["condition"],
            "service_healthy"
        );
    }
    // The database URL names the postgres service and its credentials.
    let url = str_at(&services["kbs1"], "/environment/KBS_STORAGE__DATABASE_URL");
    let pg = &services["postgres"]["environment"];
    let expected = format!(
        "postgres://{}:{}@postgres:5432/{}",
        str_at(pg, "/POSTGRES_USER"),
        str_at(pg, "/POSTGRES_PASSWORD"),
        str_at(pg, "/POSTGRES_DB")
    );
    assert_eq!(url, expected);
    // HAProxy listens on the published port and mounts deploy/haproxy.cfg: the same file
    // as the tests' (one config, not two).
    assert_eq!(str_at(haproxy, "/environment/TETHER_LB_BIND"), ":8080");
    assert_eq!(haproxy["ports"][0], "127.0.0.1:8080:8080");
    let mount = str_at(haproxy, "/volumes/0");
    let source = mount.split(':').next().unwrap();
    assert_eq!(
        deploy().join(source).canonicalize().unwrap(),
        haproxy_cfg().canonicalize().unwrap(),
        "{mount}"
    );
    assert!(
        mount.ends_with(":/usr/local/etc/haproxy/haproxy.cfg:ro"),
        "{mount}"
    );
}

#[test]
fn haproxy_cfg_balances_without_stickiness_and_checks_readyz() {
    let cfg = read(&haproxy_cfg());
    let directives: Vec<&str> = cfg
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let servers: Vec<&&str> = directives
        .iter()
        .filter(|l| l.starts_with("server "))
        .collect();
    assert_eq!(servers.len(), HAPROXY_BACKENDS, "{servers:?}");
    for (i, s) in servers.iter().enumerate() {
        assert!(s.contains(&format!("\"${{TETHER_KBS_{}}}\"", i + 1)), "{s}");
    }
    for needed in [
        "balance roundrobin",
        "option httpchk GET /readyz",
        "timeout tunnel 1h",
    ] {
        assert!(directives.contains(&needed), "missing `{needed}`");
    }
    for sticky in ["cookie", "stick", "balance source", "prefer-last-server"] {
        assert!(
            !directives.iter().any(|d| d.contains(sticky)),
            "`{sticky}`: RCAR needs no sticky sessions"
        );
    }

    let Some(bin) = haproxy_binary() else {
        skip(
            "haproxy_cfg_balances_without_stickiness_and_checks_readyz",
            "haproxy is not installed: `haproxy -c` not run",
        );
        return;
    };
    let out = std::process::Command::new(bin)
        .arg("-c")
        .arg("-f")
        .arg(haproxy_cfg())
        .env("TETHER_LB_BIND", ":8080")
        .env("TETHER_LB_STATS", "127.0.0.1:8404")
        .envs((1..=HAPROXY_BACKENDS).map(|i| (format!("TETHER_KBS_{i}"), format!("kbs{i}:8080"))))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "haproxy -c: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn kubernetes_manifests_agree_with_each_other() {
    let dir = deploy().join("k8s");
    let kustomization = one(&dir.join("kustomization.yaml"));
    let mut all = Vec::new();
    for file in kustomization["resources"].as_array().expect("resources") {
        all.extend(documents(&dir.join(file.as_str().unwrap())));
    }
    let deployment = manifest(&all, "Deployment", "tether-kbs");
    assert_eq!(deployment["spec"]["replicas"], 3);
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["ports"][0]["containerPort"], 8080);
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_eq!(deployment["spec"]["selector"]["matchLabels"], *labels);

    // The Service selects the replicas and forwards to their port.
    let service = manifest(&all, "Service", "tether-kbs");
    assert_eq!(service["spec"]["selector"], *labels);
    assert_eq!(service["spec"]["ports"][0]["port"], 8080);
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "http");
    assert_eq!(container["ports"][0]["name"], "http");

    // The database URL comes from a Secret that has it, and names the PostgreSQL Service.
    let env = &container["env"][0];
    assert_eq!(env["name"], "KBS_STORAGE__DATABASE_URL");
    let db_ref = &env["valueFrom"]["secretKeyRef"];
    let db_secret = manifest(&all, "Secret", str_at(db_ref, "/name"));
    let url = str_at(
        db_secret,
        &format!("/stringData/{}", str_at(db_ref, "/key")),
    );
    assert!(url.starts_with("postgres://"), "{url}");
    let pg_service = manifest(&all, "Service", "tether-postgres");
    let pg_port = pg_service["spec"]["ports"][0]["port"].as_u64().unwrap();
    assert!(
        url.contains(&format!("@tether-postgres:{pg_port}/")),
        "{url}"
    );
    let pg = manifest(&all, "StatefulSet", "tether-postgres");
    assert_eq!(pg["spec"]["serviceName"], "tether-postgres");

    // The key files: every file the config names under the Secret's mount is in the Secret.
    let volume = |name: &str| {
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
    };
    let mount = |name: &str| {
        container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("no mount {name}"))
    };
    let keys_dir = PathBuf::from(str_at(mount("keys"), "/mountPath"));
    let keys = manifest(&all, "Secret", str_at(volume("keys"), "/secret/secretName"));
    let config_map = manifest(
        &all,
        "ConfigMap",
        str_at(volume("config"), "/configMap/name"),
    );
    let toml = str_at(config_map, "/data/kbs.toml");
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("kbs.toml");
    std::fs::write(&file, toml).unwrap();
    let config = server::config::Config::load(Some(&file), std::iter::empty())
        .unwrap_or_else(|e| panic!("the ConfigMap's kbs.toml: {e}"));
    assert_eq!(config.http.listen.port(), 8080);
    assert_eq!(
        container["args"],
        serde_json::json!(["--config", str_at(mount("config"), "/mountPath")])
    );
    let named = [
        config.storage.kek_file.clone().expect("kek_file"),
        config
            .attestation
            .signing_key_file
            .clone()
            .expect("signing_key_file"),
        config.admin.keys[0].public_key_file.clone(),
    ];
    for path in named {
        assert_eq!(
            path.parent(),
            Some(keys_dir.as_path()),
            "{}",
            path.display()
        );
        let key = path.file_name().unwrap().to_str().unwrap();
        assert!(
            keys["stringData"].get(key).is_some(),
            "Secret tether-keys has no {key}"
        );
    }
    assert!(!config.admin.dev_key, "no generated admin key in a cluster");
    assert_eq!(
        config.storage.data_dir,
        PathBuf::from(str_at(mount("data"), "/mountPath"))
    );
}
