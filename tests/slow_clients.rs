//! The slow-client attack (benches/slowclients.py) on gunicorn's synchronous workers behind Portcullis:
//! uploads that trickle their body and readers that take a large response at 1 KiB/s must not hold the app's
//! workers, so that ordinary requests are still answered (issue 12; gunicorn's deployment guide: the proxy
//! "must buffer slow clients").

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use portcullis_tests::gunicorn::Gunicorn;
use portcullis_tests::{Pki, Portcullis, TempDir, config};
use serde_json::Value;

/// gunicorn `-k sync -w 2` behind Portcullis' defaults; 8 uploads declaring 1 MiB and sending 1 byte every
/// 2 s, and 8 readers of an 8 MiB response (4 KiB receive buffer, 1 KiB/s), held for 15 s. Meanwhile 40+
/// plain GETs, each on a fresh connection with a 5 s timeout, all succeed; the app never sees an upload
/// (none of them completed), and the readers are answered.
#[test]
fn slow_uploads_and_slow_readers_do_not_starve_gunicorn_sync_workers() {
    let dir = TempDir::new("slow-clients");
    let pki = Pki::new(dir.path(), &[]);
    let g = Gunicorn::start(dir.path(), "flask_app:app", 2);
    let p = Portcullis::run(&dir.write("p.toml", &config(&pki, &g.upstream(), "")), &[]);
    assert!(p.ready, "{}", p.output());

    let s = attack(
        &p,
        &pki,
        &[
            "--duration",
            "15",
            "--uploaders",
            "8",
            "--readers",
            "8",
            "--upload-path",
            "/sink",
            "--read-path",
            "/big/8388608",
        ],
    );
    let report = || {
        format!(
            "attack summary:\n{s:#}\napp seen log:\n{}\ngunicorn access log:\n{}\nportcullis log (last 40 lines):\n{}",
            g.seen(),
            g.access_log(),
            tail(&p.output(), 40)
        )
    };

    // The attack was on: every slow client got its request out.
    let (uploads, reads) = (&s["slow_uploaders"], &s["slow_readers"]);
    assert!(
        uploads["connections"].as_u64() >= Some(8) && reads["connections"].as_u64() >= Some(8),
        "the slow clients did not all connect; {}",
        report()
    );

    let gets = &s["plain_gets"];
    let (ok, failed) = (
        gets["ok"].as_u64().unwrap(),
        gets["failed"].as_u64().unwrap(),
    );
    assert!(
        failed == 0 && ok >= 40,
        "plain GETs during the attack: {ok} ok, {failed} failed ({}), p50 {} ms, max {} ms; {}",
        gets["failures"],
        gets["p50_ms"],
        gets["max_ms"],
        report()
    );

    // The app served the readers while they read slowly (their responses went out at the proxy's pace).
    assert!(
        reads["answered"]["200"].as_u64() >= Some(8),
        "not every slow reader got its response started; {}",
        report()
    );

    // By the time the after-attack GET is answered, gunicorn's backlog has been drained (it accepts in
    // order): whatever Portcullis passed on has been started by a worker and is in the seen log.
    assert_eq!(
        s["after_attack"]["ok"],
        Value::Bool(true),
        "no GET succeeded after the attack; {}",
        report()
    );
    let seen = g.seen();
    let reached: Vec<&str> = seen
        .lines()
        .filter(|l| l.contains("from=slow-uploader"))
        .collect();
    assert!(
        reached.is_empty() && !g.access_log().contains("from=slow-uploader"),
        "{} slow uploads reached the app although none completed: {reached:?}; {}",
        reached.len(),
        report()
    );
}

/// Runs benches/slowclients.py (Debian's python3, standard library only) against the proxy, trusting the
/// test CA; its JSON summary. Bounded by the script itself (duration + GET timeout + 30 s for the
/// after-attack GET); killed past 120 s as a safety net.
fn attack(p: &Portcullis, pki: &Pki, args: &[&str]) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../benches/slowclients.py");
    let mut child = Command::new("/usr/bin/python3")
        .arg(&script)
        .arg("--url")
        .arg(format!("https://localhost:{}", p.https_addr().port()))
        .arg("--ca")
        .arg(pki.ca_path())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("/usr/bin/python3 is needed (Debian package python3, with gunicorn)");
    let limit = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > limit {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "slowclients.py: {}\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("slowclients.py printed no JSON ({e}):\n{text}"))
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
