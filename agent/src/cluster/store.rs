//! The master's persistent state behind one interface, so a replicated store can replace the
//! local one later. The local store is a [`Wal`] of `MasterRecord`s (each one the full latest
//! view of a task or an agent; the last one wins), compacted when it is opened.
use std::collections::HashMap;
use std::io;
use std::path::Path;

use caisson_proto::master_record::Rec;
use caisson_proto::{AgentRecord, MasterRecord, Task};

use super::wal::{self, Notify, Wal};

/// What the master keeps across restarts.
#[derive(Default)]
pub struct Snapshot {
    /// In submission order.
    pub tasks: Vec<Task>,
    pub agents: Vec<AgentRecord>,
}

pub trait Store: Send + Sync {
    /// Records the latest view of a task; `notify` runs once it is durable.
    fn put_task(&self, task: &Task, notify: Option<Notify>);
    fn put_agent(&self, agent: &AgentRecord, notify: Option<Notify>);
}

/// The local, single-node store: `<dir>/master.log`.
pub struct LogStore {
    wal: Wal,
}

impl LogStore {
    /// Opens (and compacts) the store in `dir`, returning what it holds.
    pub fn open(dir: &Path) -> io::Result<(LogStore, Snapshot)> {
        let path = dir.join("master.log");
        let records: Vec<MasterRecord> = wal::read_all(&path)?;
        let mut order = vec![];
        let mut tasks: HashMap<String, Task> = HashMap::new();
        let mut agents: HashMap<String, AgentRecord> = HashMap::new();
        let mut agent_order = vec![];
        for r in records {
            match r.rec {
                Some(Rec::Task(t)) => {
                    if !tasks.contains_key(&t.id) {
                        order.push(t.id.clone());
                    }
                    tasks.insert(t.id.clone(), t);
                }
                Some(Rec::Agent(a)) => {
                    if !agents.contains_key(&a.id) {
                        agent_order.push(a.id.clone());
                    }
                    agents.insert(a.id.clone(), a);
                }
                None => {}
            }
        }
        let snap = Snapshot {
            tasks: order.iter().filter_map(|id| tasks.remove(id)).collect(),
            agents: agent_order
                .iter()
                .filter_map(|id| agents.remove(id))
                .collect(),
        };
        let compact: Vec<MasterRecord> = snap
            .agents
            .iter()
            .map(|a| MasterRecord {
                rec: Some(Rec::Agent(a.clone())),
            })
            .chain(snap.tasks.iter().map(|t| MasterRecord {
                rec: Some(Rec::Task(t.clone())),
            }))
            .collect();
        let wal = Wal::open(&path, &compact)?;
        Ok((LogStore { wal }, snap))
    }
}

impl Store for LogStore {
    fn put_task(&self, task: &Task, notify: Option<Notify>) {
        let rec = MasterRecord {
            rec: Some(Rec::Task(task.clone())),
        };
        self.wal.append(&rec, notify);
    }

    fn put_agent(&self, agent: &AgentRecord, notify: Option<Notify>) {
        let rec = MasterRecord {
            rec: Some(Rec::Agent(agent.clone())),
        };
        self.wal.append(&rec, notify);
    }
}
