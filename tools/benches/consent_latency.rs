//! Consent latency on the real PC/SC stack: from the card's GENERAL AUTHENTICATE answer
//! arriving at the watcher to a reader blocked in `Engine::read` (in-memory sites, 2-of-3,
//! 64 KiB chunks) returning its first byte. Also reports the whole presentation (card seen by
//! pcscd -> grant is not observable here; we report insertion of the virtual card process ->
//! first byte, which includes the vpcd connection and pcscd's ~0.4 s polling).
//!
//! Run: `cargo bench -p qgenome-tools --bench consent_latency` (root: starts pcscd; takes the
//! card test lock). `QGENOME_BENCH_ROUNDS` sets the number of presentations (default 25).

use anyhow::{bail, ensure, Context, Result};
use qgenome::catalog::Catalog;
use qgenome::consent::watcher::{self, CardConsent, ConsentMode, WatchEvent, WatcherConfig};
use qgenome::consent::{card_handler, ConsentRegistry, PcscReaders};
use qgenome::fs::{Engine, EngineConfig};
use qgenome::sharing::{Drbg, RandomSource};
use qgenome::sites::{MemSite, ShareSite};
use qgenome_tools::harness::{CardTestLock, Pcscd, Vcard};
use serde_json::json;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const READER: &str = "Virtual PCD 00 00";

fn main() -> Result<()> {
    let rounds: usize = std::env::var("QGENOME_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(25);
    let _lock = CardTestLock::acquire()?;
    let dir = tempfile::tempdir()?;
    let _pcscd = Pcscd::start(&dir.path().join("pcscd.log"), 35963)?;

    let catalog = Arc::new(Catalog::open(&dir.path().join("catalog"))?);
    catalog.add_patient("P0001")?;
    let registry = ConsentRegistry::new(catalog.clone());
    let sites: Vec<Arc<dyn ShareSite>> = (0..3)
        .map(|i| Arc::new(MemSite::new(&format!("site{i}"))) as Arc<dyn ShareSite>)
        .collect();
    let cfg = EngineConfig {
        chunk_size: 64 << 10,
        consent_wait: Duration::from_secs(60),
        ..EngineConfig::default()
    };
    let engine = Engine::new(catalog.clone(), registry.clone(), sites, cfg)?;
    let mut data = vec![0u8; 256 << 10];
    Drbg::from_os()?.fill(&mut data)?;
    let mut w = engine.create("P0001", "run1.cram", 0o644)?;
    w.write(&engine, 0, &data)?;
    w.commit(&engine)?;
    let rec = catalog.file("P0001", "run1.cram")?.context("committed")?;
    let chunks = catalog.chunks(&rec.id)?;

    let cards = CardConsent::new(catalog.clone(), registry.clone());
    let (tx, events) = std::sync::mpsc::channel::<WatchEvent>();
    let tx = Mutex::new(tx);
    let _watcher = watcher::start(
        cards.clone(),
        WatcherConfig {
            mode: ConsentMode::UntilRemoved,
            reader: Some(READER.into()),
            on_event: Some(Arc::new(move |ev: &WatchEvent| {
                let _ = tx.lock().unwrap().send(ev.clone());
            })),
            ..WatcherConfig::default()
        },
    )?;
    let handler = card_handler(cards, Arc::new(PcscReaders::default()));
    let state = dir.path().join("card.state");
    let bin = Path::new(env!("CARGO_BIN_EXE_qgenome-vcard"));
    let start_card = |n: usize| {
        Vcard::start(
            bin,
            &["--port", "35963", "--state", state.to_str().unwrap()],
            &dir.path().join(format!("vcard-{n}.log")),
        )
    };
    let next = || -> Result<WatchEvent> {
        events
            .recv_timeout(Duration::from_secs(20))
            .context("no watcher event within 20 s")
    };

    // Enroll the card (first presentation is refused as unknown).
    let vc = start_card(0)?;
    match next()? {
        WatchEvent::Refused {
            code: "unknown-card",
            ..
        } => {}
        other => bail!("expected unknown-card, got {other:?}"),
    }
    let reply = handler(&json!({"cmd": "card-enroll", "patient": "P0001", "reader": READER}))
        .context("handler")?;
    ensure!(reply["ok"] == json!(true), "{reply}");
    drop(vc);
    ensure!(matches!(next()?, WatchEvent::Removed { .. }));

    let mut answer_to_byte = Vec::with_capacity(rounds);
    let mut insert_to_byte = Vec::with_capacity(rounds);
    for n in 1..=rounds {
        let (engine2, rec2, chunks2) = (engine.clone(), rec.clone(), chunks.clone());
        let reader = std::thread::spawn(move || {
            let got = engine2.read(&rec2, &chunks2, 0, 1);
            (Instant::now(), got)
        });
        std::thread::sleep(Duration::from_millis(20));
        ensure!(!reader.is_finished(), "read returned without consent");
        let inserted = Instant::now();
        let vc = start_card(n)?;
        let answered = match next()? {
            WatchEvent::Granted { presented, .. } => presented.answered_at,
            other => bail!("expected a grant, got {other:?}"),
        };
        let (first_byte, got) = reader.join().expect("reader thread");
        let got = got?;
        ensure!(got.len() == 1 && got[0] == data[0], "wrong first byte");
        answer_to_byte.push(first_byte.saturating_duration_since(answered));
        insert_to_byte.push(first_byte - inserted);
        drop(vc);
        ensure!(matches!(next()?, WatchEvent::Removed { .. }));
    }
    report("answer->first byte", &mut answer_to_byte);
    report("card process start->first byte", &mut insert_to_byte);
    Ok(())
}

fn report(what: &str, v: &mut [Duration]) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "consent latency, {what}: median {:.2} ms, max {:.2} ms, min {:.2} ms over {} presentations",
        ms(v[v.len() / 2]),
        ms(v[v.len() - 1]),
        ms(v[0]),
        v.len()
    );
}
