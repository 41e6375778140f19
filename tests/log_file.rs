//! `[log] file` through the real binary: access lines land in the file (text and JSON, `request_id` in
//! them) and not on stderr; logrotate's rename + SIGUSR1 sends new lines to a new file at the path while
//! the old one keeps the earlier ones, with none lost while requests keep coming; a file in a folder that
//! does not exist stops the start with a clear error; started as root and run as `nobody`, the file (root's)
//! still gets every line, the writer thread is as unprivileged as the rest, and a reopen the service user
//! cannot make keeps the old file until logrotate's `create` gives it one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod launch;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use launch::{Deployment, assert_unprivileged, nobody, require_root};
use portcullis_tests::{Client, Portcullis, Setup, config};

fn log_config(file: &Path, format: &str) -> String {
    format!(
        "[log]\nfile = \"{}\"\nformat = \"{format}\"\n",
        file.display()
    )
}

/// The lines of `files` that are access lines, once there are `n` of them (10 s at most: the writer is a
/// thread of its own, behind the response).
fn wait_for_lines(files: &[&Path], n: usize) -> Vec<Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all: Vec<Vec<String>> = files
            .iter()
            .map(|f| {
                std::fs::read_to_string(f)
                    .unwrap_or_default()
                    .lines()
                    .map(str::to_owned)
                    .collect()
            })
            .collect();
        let count: usize = all.iter().map(Vec::len).sum();
        if count >= n || Instant::now() >= deadline {
            assert_eq!(count, n, "access lines in {files:?}: {all:#?}");
            return all;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The request paths named by access lines.
fn paths(lines: &[String]) -> BTreeSet<String> {
    lines
        .iter()
        .map(|l| {
            let at = l.find("path=").expect("an access line") + 5;
            l[at..].split(' ').next().unwrap().to_owned()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_lines_land_in_the_file_and_not_on_stderr() {
    for format in ["text", "json"] {
        let dir = portcullis_tests::TempDir::new("logfile");
        let file = dir.path().join("access.log");
        let s = Setup::new("", &log_config(&file, format)).await;
        for i in 0..5 {
            let res = s.client.get(s.https(), &format!("/to-file-{i}")).await;
            assert_eq!(res.status(), 200);
        }
        let lines = wait_for_lines(&[&file], 5).remove(0);
        for (i, line) in lines.iter().enumerate() {
            assert!(line.contains(&format!("/to-file-{i}")), "{line}");
            if format == "json" {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                assert_eq!(v["target"], "access");
                assert_eq!(v["status"], 200);
                assert_eq!(v["request_id"].as_str().unwrap().len(), 32, "{line}");
            } else {
                assert!(
                    line.contains(" access: ") && line.contains("request_id=\""),
                    "{line}"
                );
            }
        }
        let stderr = s.proxy.output();
        assert!(!stderr.contains("/to-file-"), "{stderr}");
        // The rest of the log is still on stderr.
        assert!(stderr.contains("listening on https://"), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rename_and_sigusr1_move_new_lines_to_a_new_file_and_lose_none() {
    let dir = portcullis_tests::TempDir::new("logrotate");
    let file = dir.path().join("access.log");
    let rotated = dir.path().join("access.log.1");
    let s = Arc::new(Setup::new("", &log_config(&file, "text")).await);

    // Before the rotation: 20 requests, all written.
    for i in 0..20 {
        assert_eq!(
            s.client
                .get(s.https(), &format!("/before-{i}"))
                .await
                .status(),
            200
        );
    }
    wait_for_lines(&[&file], 20);

    // During it: 200 requests from two clients while the file is renamed and SIGUSR1 sent.
    let during: Vec<_> = (0..2)
        .map(|c| {
            let s = s.clone();
            tokio::spawn(async move {
                for i in 0..100 {
                    let res = s.client.get(s.https(), &format!("/during-{c}-{i}")).await;
                    assert_eq!(res.status(), 200);
                }
            })
        })
        .collect();
    // Some of them answered first (the recording upstream has seen them).
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.upstream.requests().len() < 60 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    std::fs::rename(&file, &rotated).unwrap();
    s.proxy.signal("USR1");
    s.proxy
        .wait_for_log(
            |l| l.contains("access log reopened"),
            Duration::from_secs(10),
        )
        .unwrap_or_else(|| panic!("no reopen: {}", s.proxy.output()));
    for d in during {
        d.await.unwrap();
    }

    // After it: 20 more, which can only be in the new file.
    for i in 0..20 {
        assert_eq!(
            s.client
                .get(s.https(), &format!("/after-{i}"))
                .await
                .status(),
            200
        );
    }
    let both = wait_for_lines(&[&rotated, &file], 240);
    let (old, new) = (paths(&both[0]), paths(&both[1]));
    assert_eq!(old.len() + new.len(), 240, "a line written twice");
    assert!(
        (0..20).all(|i| old.contains(&format!("/before-{i}"))),
        "{old:?}"
    );
    assert!(
        (0..20).all(|i| new.contains(&format!("/after-{i}"))),
        "{new:?}"
    );
    let during_lines = old
        .iter()
        .chain(&new)
        .filter(|p| p.starts_with("/during-"))
        .count();
    assert_eq!(during_lines, 200);
    assert!(!new.iter().any(|p| p.starts_with("/before-")), "{new:?}");
    eprintln!(
        "rotation under load: {} lines in the old file, {} in the new one",
        old.len(),
        new.len()
    );
}

#[test]
fn a_log_file_in_a_folder_that_does_not_exist_stops_the_start() {
    let dir = portcullis_tests::TempDir::new("logfile-missing");
    let pki = portcullis_tests::Pki::new(dir.path(), &[]);
    let missing = dir.path().join("no-such-folder").join("access.log");
    let path = dir.write(
        "p.toml",
        &config(&pki, "127.0.0.1:9", &log_config(&missing, "text")),
    );
    let mut p = Portcullis::run(&path, &[]);
    assert!(!p.ready);
    assert_eq!(p.wait().code(), Some(64), "{}", p.output());
    let out = p.output();
    assert!(
        out.contains("log.file")
            && out.contains(&format!(
                "the folder {} does not exist",
                missing.parent().unwrap().display()
            )),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_owned_log_keeps_every_line_after_the_drop_to_nobody() {
    require_root();
    let d = Deployment::new("logfile-root").await;
    // The log folder is root's and only root may write in it: nobody cannot make a file there.
    let logs: PathBuf = d.dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    let file = logs.join("access.log");
    let text = config(
        &d.pki,
        &d.upstream.addr_string(),
        &format!(
            "{}[process]\nuser = \"nobody\"\n",
            log_config(&file, "text")
        ),
    );
    let p = Portcullis::run(&d.dir.write("p.toml", &text), &[]);
    assert!(p.ready, "{}", p.output());
    let client = Client::new(&d.pki.ca_pem);
    // Every thread, the log writer's included, is nobody with no capability.
    let threads = assert_unprivileged(p.pid(), nobody(), true);
    let names: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", p.pid()))
        .unwrap()
        .map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).unwrap())
        .collect();
    assert!(
        names.iter().any(|n| n.trim() == "portcullis-acce"),
        "no writer thread among {threads}: {names:?}"
    );
    for i in 0..5 {
        assert_eq!(
            client
                .get(p.https_addr(), &format!("/a-{i}"))
                .await
                .status(),
            200
        );
    }
    wait_for_lines(&[&file], 5);
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&file).unwrap()),
        0
    );

    // Rotated without `create`: nobody cannot make the new file, so the old one keeps the lines.
    let rotated = logs.join("access.log.1");
    std::fs::rename(&file, &rotated).unwrap();
    p.signal("USR1");
    p.wait_for_log(
        |l| l.contains("cannot reopen the access log"),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|| panic!("no reopen error: {}", p.output()));
    for i in 0..5 {
        assert_eq!(
            client
                .get(p.https_addr(), &format!("/b-{i}"))
                .await
                .status(),
            200
        );
    }
    wait_for_lines(&[&rotated], 10);

    // logrotate's `create 0640 nobody adm`: the new file is the service user's, and the reopen takes it.
    std::fs::write(&file, "").unwrap();
    let (uid, gid) = nobody();
    std::os::unix::fs::chown(&file, Some(uid), Some(gid)).unwrap();
    p.signal("USR1");
    p.wait_for_log(
        |l| l.contains("access log reopened"),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|| panic!("no reopen: {}", p.output()));
    for i in 0..5 {
        assert_eq!(
            client
                .get(p.https_addr(), &format!("/c-{i}"))
                .await
                .status(),
            200
        );
    }
    let both = wait_for_lines(&[&rotated, &file], 15);
    assert_eq!(paths(&both[1]), (0..5).map(|i| format!("/c-{i}")).collect());
}
