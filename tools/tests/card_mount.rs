//! The patient's card in front of a real mount: real pcscd + vpcd, the virtual PIV card, three
//! real mountd sites, `qgenome mount` with `[card]` (until-removed), and samtools reading.
//! Holds the cross-process card test lock (one pcscd, fixed vpcd ports).
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use qgenome::deploy::{retry, DeployOptions, Deployment, VirtualCard};
use qgenome_tools::harness::{CardTestLock, Pcscd};
use serde_json::json;

const FIXTURES: &str = "/usr/share/htslib-test/test";

fn samtools_view(cram: &Path) -> Command {
    let mut c = Command::new("samtools");
    c.args(["view", "-T"])
        .arg(Path::new(FIXTURES).join("ce.fa"))
        .arg(cram)
        .env("REF_PATH", "/nonexistent")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

#[test]
fn a_blocked_samtools_view_returns_data_when_the_enrolled_card_is_presented() {
    let _lock = CardTestLock::acquire().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _pcscd = Pcscd::start(&dir.path().join("pcscd.log"), 35963).unwrap();
    let mut opts = DeployOptions::new(&dir.path().join("deploy"));
    opts.volume_size = 64 << 20;
    opts.key_size = 16 << 20;
    opts.key_window = 1 << 20;
    opts.card = true;
    opts.consent_wait_secs = 60;
    let mut d = Deployment::start_sites(opts).unwrap();
    d.mount().unwrap();
    let bin = d.bin_dir().to_path_buf();

    // A CRAM written into the mount by samtools.
    std::fs::create_dir(d.mountpoint.join("P0001")).unwrap();
    let cram = d.mountpoint.join("P0001/range.cram");
    let st = Command::new("samtools")
        .args(["view", "--no-PG", "-C", "-T"])
        .arg(Path::new(FIXTURES).join("ce.fa"))
        .arg("-o")
        .arg(&cram)
        .arg(Path::new(FIXTURES).join("range.cram"))
        .env("REF_PATH", "/nonexistent")
        .status()
        .unwrap();
    assert!(st.success());
    let want = samtools_view(&Path::new(FIXTURES).join("range.cram"))
        .output()
        .unwrap()
        .stdout;
    assert!(!want.is_empty());

    // Enroll the card, then take it out.
    let state = dir.path().join("card.state");
    let card = VirtualCard::insert(&bin, &state, &dir.path().join("vcard.log")).unwrap();
    retry(Duration::from_secs(10), || {
        d.control(&json!({"cmd": "card-enroll", "patient": "P0001"}))
    })
    .unwrap();
    card.remove();
    std::thread::sleep(Duration::from_secs(1));

    // With cards, an admin grant is refused (the configuration does not allow it), and
    // the refusal is audited with its caller.
    let e = d
        .control(&json!({"cmd": "consent-grant", "patient": "P0001", "minutes": 5}))
        .expect_err("an admin grant beside cards");
    let e = format!("{e:#}");
    assert!(e.contains("admin_grant = true"), "{e}");

    // samtools blocks without the card...
    let blocked = samtools_view(&cram).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let mut blocked = blocked;
    assert!(
        blocked.try_wait().unwrap().is_none(),
        "samtools read the file without consent"
    );

    // ...and returns the right records once the card is presented.
    let card = VirtualCard::insert(&bin, &state, &dir.path().join("vcard.log")).unwrap();
    let out = blocked.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        out.stdout, want,
        "records read under card consent differ from the source"
    );

    // Card removed (until-removed mode): later reads block again.
    card.remove();
    let gone = retry(Duration::from_secs(5), || {
        let g = d.control(&json!({"cmd": "consent-list"}))?;
        anyhow::ensure!(
            g["grants"].as_array().is_some_and(Vec::is_empty),
            "still granted: {g}"
        );
        Ok(())
    });
    assert!(gone.is_ok(), "removal did not end the consent: {gone:?}");
    let mut again = samtools_view(&cram).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        again.try_wait().unwrap().is_none(),
        "a read after removal did not block"
    );
    let _ = again.kill();
    let _ = again.wait();

    // The audit log tells the story.
    let audit = d.control(&json!({"cmd": "audit", "last": 200})).unwrap();
    let events: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["event"].as_str())
        .collect();
    for e in ["consent-grant", "consent-end", "consent-refused"] {
        assert!(events.contains(&e), "no {e} in the audit log: {events:?}");
    }
    // The refused admin grant names its caller, from the socket's credentials.
    // SAFETY: geteuid has no preconditions.
    let caller = format!("admin grant (uid {}, pid ", unsafe { libc::geteuid() });
    assert!(
        audit["entries"].as_array().unwrap().iter().any(|e| {
            e["event"] == "consent-refused"
                && e["detail"].as_str().is_some_and(|d| d.starts_with(&caller))
        }),
        "the refused admin grant does not name its caller: {audit}"
    );
    let reads = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "read" && e["file"] == "range.cram")
        .count();
    assert!(
        reads >= 1,
        "the read under the card's consent was not audited: {audit}"
    );
}
