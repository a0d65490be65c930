//! A TCP relay on a loopback port in front of a real server, whose open connections can be
//! frozen: the sockets stay open, nothing is read or written, as after a failover that leaves
//! the old address silent or behind a stuck middlebox. New connections are relayed normally.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// How long a frozen connection is held open at most (then the relay lets it go).
const FROZEN_FOR_AT_MOST: Duration = Duration::from_secs(300);

pub struct Relay {
    pub port: u16,
    accepted: Arc<AtomicUsize>,
    freezes: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
    /// Dropping the relay aborts every task and closes every socket.
    _tasks: Arc<Mutex<JoinSet<()>>>,
}

impl Relay {
    /// Relays 127.0.0.1:<port> to 127.0.0.1:`target`.
    pub async fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let freezes: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::new(Mutex::new(Vec::new()));
        let tasks = Arc::new(Mutex::new(JoinSet::new()));
        let (counter, flags, spawner) = (accepted.clone(), freezes.clone(), Arc::downgrade(&tasks));
        tasks.lock().unwrap().spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else { continue };
                counter.fetch_add(1, Ordering::SeqCst);
                let frozen = Arc::new(AtomicBool::new(false));
                flags.lock().unwrap().push(frozen.clone());
                let Some(tasks) = spawner.upgrade() else { return };
                tasks.lock().unwrap().spawn(pump(client, server, frozen));
            }
        });
        Self { port, accepted, freezes, _tasks: tasks }
    }

    /// Connections relayed so far.
    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Every connection open now goes silent (kept open, never read or written again).
    pub fn freeze_existing(&self) {
        for flag in self.freezes.lock().unwrap().iter() {
            flag.store(true, Ordering::SeqCst);
        }
    }
}

async fn pump(mut client: TcpStream, mut server: TcpStream, frozen: Arc<AtomicBool>) {
    let (mut up, mut down) = ([0u8; 16 * 1024], [0u8; 16 * 1024]);
    loop {
        if frozen.load(Ordering::SeqCst) {
            // Silent but open: hold both sockets until the relay is dropped (bounded).
            tokio::time::sleep(FROZEN_FOR_AT_MOST).await;
            return;
        }
        // Wake up now and then to notice a freeze even while nothing flows.
        let tick = tokio::time::sleep(Duration::from_millis(20));
        tokio::select! {
            read = client.read(&mut up) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if frozen.load(Ordering::SeqCst) { continue; }
                    if server.write_all(&up[..n]).await.is_err() { return; }
                }
            },
            read = server.read(&mut down) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if frozen.load(Ordering::SeqCst) { continue; }
                    if client.write_all(&down[..n]).await.is_err() { return; }
                }
            },
            () = tick => {}
        }
    }
}
