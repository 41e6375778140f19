//! The command line contract: `run`, `check` (exit 64 with FILE:LINE:COL: key: problem), `demo`,
//! `--version`, `--help`; startup failures name the file at fault.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use portcullis_tests::client::{get_on, insecure_config};
use portcullis_tests::{Pki, Portcullis, TempDir, binary, config};

fn portcullis(args: &[&str]) -> std::process::Output {
    Command::new(binary()).args(args).output().unwrap()
}

#[test]
fn version_and_help() {
    let v = portcullis(&["--version"]);
    assert!(v.status.success());
    assert_eq!(
        String::from_utf8_lossy(&v.stdout).trim(),
        format!("portcullis {}", env!("CARGO_PKG_VERSION"))
    );
    let h = String::from_utf8_lossy(&portcullis(&["--help"]).stdout).into_owned();
    for cmd in ["run", "check", "demo"] {
        assert!(h.contains(cmd), "{h}");
    }
}

#[test]
fn check_accepts_a_good_config_and_lists_every_problem_of_a_bad_one() {
    let dir = TempDir::new("check");
    let pki = Pki::new(dir.path(), &[]);
    let good = dir.write("good.toml", &config(&pki, "127.0.0.1:8000", ""));
    let out = portcullis(&["check", "--config", good.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bad_text = config(&pki, "nowhere", "[timeouts]\nshutdown = \"forever\"\n")
        .replace("path = \"/\"", "path = \"relative\"");
    let bad = dir.write("bad.toml", &bad_text);
    let out = portcullis(&["check", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    let prefix = format!("{}:", bad.display());
    for (line, key) in lines.iter().zip([
        "upstream.app.servers[0]",
        "route[0].path",
        "timeouts.shutdown",
    ]) {
        assert!(line.starts_with(&prefix), "{line}");
        assert!(line.contains(&format!(": {key}: ")), "{key} not in {line}");
        let rest = &line[prefix.len()..];
        let mut parts = rest.splitn(3, ':');
        assert!(
            parts.next().unwrap().parse::<usize>().is_ok(),
            "no line number: {line}"
        );
        assert!(
            parts.next().unwrap().parse::<usize>().is_ok(),
            "no column: {line}"
        );
    }

    let unknown = dir.write(
        "unknown.toml",
        &config(&pki, "127.0.0.1:8000", "[tls2]\nx = 1\n"),
    );
    let out = portcullis(&["check", "--config", unknown.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("tls2"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn run_refuses_a_bad_config_and_a_missing_certificate() {
    let dir = TempDir::new("runbad");
    let pki = Pki::new(dir.path(), &[]);
    let bad = dir.write("bad.toml", "[listen]\nhttps = 443\n");
    let out = portcullis(&["run", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad.toml:2:9"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let missing = config(&pki, "127.0.0.1:8000", "").replace("fullchain.pem", "gone.pem");
    let path = dir.write("missing.toml", &missing);
    let out = portcullis(&["run", "--config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("gone.pem"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serves_its_built_in_page_over_a_self_signed_certificate() {
    let p = Portcullis::start(&["demo", "--https", "127.0.0.1:0"]);
    assert!(p.ready, "{}", p.output());
    let tcp = tokio::net::TcpStream::connect(p.https_addr())
        .await
        .unwrap();
    let tls =
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(insecure_config(&[b"http/1.1"])))
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .unwrap();
    let res = get_on(tls, "/").await;
    assert_eq!(res.status(), 200);
    let body = String::from_utf8_lossy(res.body());
    assert!(body.contains("Hello from the built-in upstream"), "{body}");
    assert!(body.contains("x-forwarded-proto"), "{body}");
    assert_eq!(res.headers()["x-content-type-options"], "nosniff");
}

#[test]
fn check_reports_each_sites_certificate_and_warns_about_trusting_everyone() {
    let dir = TempDir::new("checksites");
    let pki = Pki::new(dir.path(), &["app.test"]);
    let text = format!(
        "names = [\"app.test\"]\ntrusted_proxies = [\"0.0.0.0/0\"]\n{}",
        config(&pki, "127.0.0.1:8000", "")
    );
    let path = dir.write("p.toml", &text);
    let out = portcullis(&["check", "--config", path.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    for want in [
        "site 0: app.test",
        "covers the site: yes",
        "issuer       CN=Portcullis Test CA",
        "ECDSA P-256, matches the certificate: yes",
        "2 certificate(s), in order: yes",
        "expires",
    ] {
        assert!(stdout.contains(want), "{want:?} missing:\n{stdout}");
    }
    assert!(
        stderr.contains("warning:")
            && stderr.contains("p.toml:2:")
            && stderr.contains("0.0.0.0/0 trusts every address"),
        "{stderr}"
    );

    // A name the certificate does not cover: refused, and said.
    let text = format!(
        "names = [\"other.test\"]\n{}",
        config(&pki, "127.0.0.1:8000", "")
    );
    let path = dir.write("q.toml", &text);
    let out = portcullis(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("covers the site: NO, missing other.test")
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not cover other.test"));
}

/// Issue 10 (Also): a route `"/api"` also routes `/apiary`, a rate-limit path `"/api*"` also counts it;
/// `check` warns about both (and still passes), and says nothing about `"/api/"`, `"/favicon.ico"`, exact
/// rate-limit paths or the built-in limit.
#[test]
fn check_warns_about_a_prefix_that_reads_like_a_segment() {
    let dir = TempDir::new("checkprefix");
    let pki = Pki::new(dir.path(), &[]);
    let routes = "[[route]]\npath = \"/api\"\nupstream = \"app\"\n\n[[route]]\npath = \"/static/\"\nupstream = \"app\"\n\n[[route]]\npath = \"/favicon.ico\"\nupstream = \"app\"\n";
    let limit = "[[rate_limit]]\nname = \"api\"\npaths = [\"/api/login\", \"/api/token*\", \"/api/v2/*\"]\nrate = \"10/minute\"\n";
    let text = config(&pki, "127.0.0.1:8000", &format!("{routes}\n{limit}"));
    let path = dir.write("p.toml", &text);
    let out = portcullis(&["check", "--config", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("warning: "))
        .collect();
    assert_eq!(warnings.len(), 2, "{stderr}");
    assert!(
        warnings[0].contains(": route[1].path: \"/api\" is a plain prefix")
            && warnings[0].contains("\"/api/\""),
        "{stderr}"
    );
    assert!(
        warnings[1].contains(": rate_limit[0].paths[1]: \"/api/token*\" also counts")
            && warnings[1].contains("\"/api/token/*\""),
        "{stderr}"
    );

    // The segment forms, and no [[rate_limit]] (the built-in one): no warning.
    let text = config(
        &pki,
        "127.0.0.1:8000",
        &routes.replace("\"/api\"", "\"/api/\""),
    );
    let path = dir.write("q.toml", &text);
    let out = portcullis(&["check", "--config", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
}

/// Review of issue 10: the harness took any line containing "ready" for the readiness line, so a start that
/// failed with "Address already in use" counted as started. A port in use fails the start, and is not ready.
#[test]
fn a_start_that_fails_on_a_port_in_use_is_not_taken_for_ready() {
    let dir = TempDir::new("inuse");
    let pki = Pki::new(dir.path(), &[]);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let text = config(&pki, "127.0.0.1:8000", "").replacen(
        "https = [\"127.0.0.1:0\"]",
        &format!("https = [\"127.0.0.1:{port}\"]"),
        1,
    );
    let mut p = Portcullis::run(&dir.write("p.toml", &text), &[]);
    assert!(
        p.output().contains("already in use"),
        "the start did not fail as this test expects:\n{}",
        p.output()
    );
    assert!(
        !p.ready,
        "a failed start was taken for ready:\n{}",
        p.output()
    );
    assert!(!p.wait().success());
}
