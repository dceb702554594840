//! An append-only log of length-delimited protobuf records with group commit: callers queue a
//! record with a callback; one writer thread writes everything queued, fsyncs once, then runs
//! the callbacks in append order. Both the master's store and the agent's outbox use it, so a
//! burst of status updates costs one fsync, not one each.
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use prost::Message;

/// Runs once the record is durable (or failed to be written).
pub type Notify = Box<dyn FnOnce(io::Result<()>) + Send>;

enum Op {
    /// The record, who to tell once it is durable, whether it must be (fsync).
    Append(Vec<u8>, Option<Notify>, bool),
}

/// Handle to the log; cloneable, appends go to the one writer thread.
#[derive(Clone)]
pub struct Wal {
    tx: mpsc::Sender<Op>,
}

/// Reads every whole record of `path`; a torn tail (a crash mid-write) is dropped.
pub fn read_all<M: Message + Default>(path: &Path) -> io::Result<Vec<M>> {
    let mut buf = vec![];
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut buf)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(e),
    }
    let mut out = vec![];
    let mut rest = &buf[..];
    while !rest.is_empty() {
        match M::decode_length_delimited(&mut rest) {
            Ok(m) => out.push(m),
            Err(_) => {
                tracing::warn!(path = %path.display(), "dropping a torn record at the log's end");
                break;
            }
        }
    }
    Ok(out)
}

fn encode_all<M: Message>(records: &[M]) -> Vec<u8> {
    let mut buf = vec![];
    for r in records {
        r.encode_length_delimited(&mut buf).expect("vec grows");
    }
    buf
}

fn rewrite(path: &Path, bytes: &[u8]) -> io::Result<File> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    OpenOptions::new().append(true).open(path)
}

impl Wal {
    /// Compacts `path` to exactly `records` (written to a temp file, fsynced, renamed), then
    /// starts the writer thread appending to it.
    pub fn open<M: Message>(path: &Path, records: &[M]) -> io::Result<Wal> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let file = rewrite(path, &encode_all(records))?;
        let (tx, rx) = mpsc::channel::<Op>();
        let path: PathBuf = path.to_path_buf();
        std::thread::Builder::new()
            .name("wal".into())
            .spawn(move || writer(path, file, rx))?;
        Ok(Wal { tx })
    }

    /// Queues `record`; `notify` runs on the writer thread once it is on disk.
    pub fn append<M: Message>(&self, record: &M, notify: Option<Notify>) {
        let bytes = record.encode_length_delimited_to_vec();
        if let Err(mpsc::SendError(Op::Append(_, Some(n), _))) =
            self.tx.send(Op::Append(bytes, notify, true))
        {
            n(Err(io::Error::other("the log is closed")));
        }
    }

    /// Queues `records` without asking for an fsync of their own: they are written with the
    /// next batch and made durable by the next record that needs it. For records whose loss in
    /// a crash is harmless (acks: the update is resent, and the master ignores duplicates).
    pub fn append_lazy_all<M: Message>(&self, records: &[M]) {
        let _ = self.tx.send(Op::Append(encode_all(records), None, false));
    }
}

fn writer(path: PathBuf, mut file: File, rx: mpsc::Receiver<Op>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let mut notes: Vec<Notify> = vec![];
        let mut buf = vec![];
        let mut result: io::Result<()> = Ok(());
        let mut sync = false;
        for Op::Append(bytes, n, durable) in batch {
            buf.extend_from_slice(&bytes);
            notes.extend(n);
            sync |= durable;
        }
        if !buf.is_empty() {
            let r = file
                .write_all(&buf)
                .and_then(|()| if sync { file.sync_data() } else { Ok(()) });
            result = result.and(r);
        }
        if let Err(e) = &result {
            tracing::error!(path = %path.display(), "log write failed: {e}");
        }
        for n in notes {
            n(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use caisson_proto::outbox_record::Rec;
    use caisson_proto::OutboxRecord;

    #[test]
    fn appends_survive_and_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let wal = Wal::open::<OutboxRecord>(&path, &[]).unwrap();
        let (tx, rx) = mpsc::channel();
        for i in 0..10 {
            let tx = tx.clone();
            let rec = OutboxRecord {
                rec: Some(Rec::Acked(format!("u{i}"))),
            };
            wal.append(
                &rec,
                Some(Box::new(move |r| tx.send((i, r.is_ok())).unwrap())),
            );
        }
        let got: Vec<(i32, bool)> = (0..10).map(|_| rx.recv().unwrap()).collect();
        assert_eq!(
            got,
            (0..10).map(|i| (i, true)).collect::<Vec<_>>(),
            "in order, durable"
        );
        // A torn record at the end (crash mid-write) is ignored.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[40, 1, 2]).unwrap();
        let back: Vec<OutboxRecord> = read_all(&path).unwrap();
        assert_eq!(back.len(), 10);
        assert_eq!(back[9].rec, Some(Rec::Acked("u9".into())));
    }
}
