//! The actor facade and supervisors, run inside an actix System: panics are caught and become supervision
//! events, strategies restart the right children, intensity escalates, stop and kill differ as documented.
// A test (bench) fails by unwrapping, expecting and panicking: the workspace lints' deny does not apply here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use aion::runtime::actor::supervisor::{ChildSpec, Intensity, Restart, Strategy, Supervisor};
use aion::runtime::actor::{Actor, Addr, Context, ExitReason};
use std::time::Duration;
use tokio::sync::mpsc;

#[derive(Debug)]
enum Msg {
    Work(u32),
    Boom,
    /// Reports "gate start", waits until the test opens the gate, reports "gate done".
    Gate(std::sync::Arc<tokio::sync::Notify>),
}

/// Reports `(name, event)` to the test.
struct Probe {
    name: &'static str,
    tx: mpsc::UnboundedSender<(String, String)>,
}

impl Actor for Probe {
    type Msg = Msg;
    async fn started(&mut self, _ctx: &mut Context<Self>) {
        let _ = self.tx.send((self.name.into(), "started".into()));
    }
    async fn handle(&mut self, msg: Msg, _ctx: &mut Context<Self>) {
        match msg {
            Msg::Work(n) => {
                let _ = self.tx.send((self.name.into(), format!("work {n}")));
            }
            Msg::Boom => panic!("injected panic in {}", self.name),
            Msg::Gate(gate) => {
                let _ = self.tx.send((self.name.into(), "gate start".into()));
                gate.notified().await;
                let _ = self.tx.send((self.name.into(), "gate done".into()));
            }
        }
    }
    async fn stopped(&mut self) {
        let _ = self.tx.send((self.name.into(), "stopped".into()));
    }
}

fn probe(
    name: &'static str,
    tx: &mpsc::UnboundedSender<(String, String)>,
    restart: Restart,
) -> (ChildSpec, Addr<Probe>) {
    let tx = tx.clone();
    ChildSpec::actor(name, restart, 16, move || Probe { name, tx: tx.clone() })
}

async fn next(rx: &mut mpsc::UnboundedReceiver<(String, String)>) -> (String, String) {
    tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("event in time").expect("channel open")
}

async fn expect(rx: &mut mpsc::UnboundedReceiver<(String, String)>, want: &[(&str, &str)]) {
    let mut got = Vec::new();
    for _ in want {
        got.push(next(rx).await);
    }
    let mut got_sorted: Vec<(String, String)> = got.clone();
    got_sorted.sort();
    let mut want_sorted: Vec<(String, String)> = want.iter().map(|(a, b)| ((*a).into(), (*b).into())).collect();
    want_sorted.sort();
    assert_eq!(got_sorted, want_sorted, "events in arrival order: {got:?}");
}

fn in_actix<F: std::future::Future<Output = ()>>(f: F) {
    actix::System::new().block_on(f);
}

#[test]
fn a_panic_is_caught_the_child_restarts_and_queued_messages_survive() {
    in_actix(async {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (a, a_addr) = probe("a", &tx, Restart::Permanent);
        let (b, b_addr) = probe("b", &tx, Restart::Permanent);
        let sup = Supervisor::new("root", Strategy::OneForOne, Intensity::default()).child(a).child(b).start();
        expect(&mut rx, &[("a", "started"), ("b", "started")]).await;
        a_addr.send(Msg::Work(1)).await.expect("send");
        a_addr.send(Msg::Boom).await.expect("send");
        a_addr.send(Msg::Work(2)).await.expect("send");
        expect(&mut rx, &[("a", "work 1"), ("a", "started"), ("a", "work 2")]).await;
        b_addr.send(Msg::Work(3)).await.expect("send");
        expect(&mut rx, &[("b", "work 3")]).await;
        let ev = sup.journal().events();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].child, "a");
        assert_eq!(ev[0].reason, ExitReason::Panicked("injected panic in a".into()));
        assert!(ev[0].restarted);
        // The arbiter is alive: actix can still run futures on it.
        let (otx, orx) = tokio::sync::oneshot::channel();
        actix::Arbiter::current().spawn(async move {
            let _ = otx.send(42);
        });
        assert_eq!(orx.await.expect("arbiter alive"), 42);
        assert_eq!(sup.shutdown().await, ExitReason::Stopped);
        expect(&mut rx, &[("b", "stopped"), ("a", "stopped")]).await;
    });
}

#[test]
fn one_for_all_restarts_every_child_and_rest_for_one_the_later_ones() {
    in_actix(async {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (a, _) = probe("a", &tx, Restart::Permanent);
        let (b, b_addr) = probe("b", &tx, Restart::Permanent);
        let (c, _) = probe("c", &tx, Restart::Permanent);
        let sup = Supervisor::new("all", Strategy::OneForAll, Intensity::default()).child(a).child(b).child(c).start();
        expect(&mut rx, &[("a", "started"), ("b", "started"), ("c", "started")]).await;
        b_addr.send(Msg::Boom).await.expect("send");
        expect(&mut rx, &[("c", "stopped"), ("a", "stopped"), ("a", "started"), ("b", "started"), ("c", "started")])
            .await;
        sup.shutdown().await;
        expect(&mut rx, &[("a", "stopped"), ("b", "stopped"), ("c", "stopped")]).await;

        let (a, _) = probe("a", &tx, Restart::Permanent);
        let (b, b_addr) = probe("b", &tx, Restart::Permanent);
        let (c, _) = probe("c", &tx, Restart::Permanent);
        let sup =
            Supervisor::new("rest", Strategy::RestForOne, Intensity::default()).child(a).child(b).child(c).start();
        expect(&mut rx, &[("a", "started"), ("b", "started"), ("c", "started")]).await;
        b_addr.send(Msg::Boom).await.expect("send");
        expect(&mut rx, &[("c", "stopped"), ("b", "started"), ("c", "started")]).await;
        sup.shutdown().await;
        expect(&mut rx, &[("a", "stopped"), ("b", "stopped"), ("c", "stopped")]).await;
    });
}

#[test]
fn transient_and_temporary_policies() {
    in_actix(async {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (t, t_addr) = probe("transient", &tx, Restart::Transient);
        let (o, o_addr) = probe("temporary", &tx, Restart::Temporary);
        let sup = Supervisor::new("p", Strategy::OneForOne, Intensity::default()).child(t).child(o).start();
        expect(&mut rx, &[("transient", "started"), ("temporary", "started")]).await;
        t_addr.send(Msg::Boom).await.expect("send");
        expect(&mut rx, &[("transient", "started")]).await;
        o_addr.send(Msg::Boom).await.expect("send");
        t_addr.stop();
        expect(&mut rx, &[("transient", "stopped")]).await;
        // Neither comes back: a stopped transient and a panicked temporary are not restarted.
        let done = sup.journal();
        tokio::time::timeout(Duration::from_secs(10), async {
            while done.events().len() < 3 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("three events");
        let ev = done.events();
        assert!(ev
            .iter()
            .any(|e| e.child == "temporary" && !e.restarted && matches!(e.reason, ExitReason::Panicked(_))));
        assert!(ev.iter().any(|e| e.child == "transient" && !e.restarted && e.reason == ExitReason::Stopped));
        assert!(rx.try_recv().is_err(), "no restart happened");
        sup.shutdown().await;
    });
}

#[test]
fn restart_intensity_exceeded_escalates_to_the_parent() {
    in_actix(async {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (w, w_addr) = probe("worker", &tx, Restart::Permanent);
        let inner = Supervisor::new(
            "inner",
            Strategy::OneForOne,
            Intensity { max_restarts: 2, within: Duration::from_secs(60) },
        )
        .child(w);
        let (other, _) = probe("other", &tx, Restart::Permanent);
        let outer = Supervisor::new(
            "outer",
            Strategy::OneForOne,
            Intensity { max_restarts: 0, within: Duration::from_secs(60) },
        )
        .child(ChildSpec::supervisor("inner", Restart::Permanent, inner))
        .child(other)
        .start();
        expect(&mut rx, &[("worker", "started"), ("other", "started")]).await;
        for _ in 0..2 {
            w_addr.send(Msg::Boom).await.expect("send");
            expect(&mut rx, &[("worker", "started")]).await;
        }
        // Third panic within the window: inner gives up, outer (max 0 restarts) gives up too.
        w_addr.send(Msg::Boom).await.expect("send");
        let reason = tokio::time::timeout(Duration::from_secs(10), outer.wait()).await.expect("outer exits");
        match reason {
            ExitReason::Failed(why) => assert!(why.contains("outer") && why.contains("inner"), "{why}"),
            other => panic!("expected Failed, got {other:?}"),
        }
        let ev = outer.journal().events();
        assert!(matches!(&ev[0].reason, ExitReason::Failed(w) if w.contains("inner: more than 2 restarts")), "{ev:?}");
        expect(&mut rx, &[("other", "stopped")]).await;
    });
}

#[test]
fn stop_finishes_the_current_message_kill_abandons_it() {
    in_actix(async {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (s, s_addr) = probe("stopme", &tx, Restart::Temporary);
        let (k, k_addr) = probe("killme", &tx, Restart::Temporary);
        let sup = Supervisor::new("p", Strategy::OneForOne, Intensity::default()).child(s).child(k).start();
        expect(&mut rx, &[("stopme", "started"), ("killme", "started")]).await;
        let (s_gate, k_gate) =
            (std::sync::Arc::new(tokio::sync::Notify::new()), std::sync::Arc::new(tokio::sync::Notify::new()));
        s_addr.send(Msg::Gate(s_gate.clone())).await.expect("send");
        k_addr.send(Msg::Gate(k_gate.clone())).await.expect("send");
        s_addr.send(Msg::Work(9)).await.expect("send");
        expect(&mut rx, &[("stopme", "gate start"), ("killme", "gate start")]).await;
        s_addr.stop();
        k_addr.kill();
        s_gate.notify_one();
        expect(&mut rx, &[("stopme", "gate done"), ("stopme", "stopped")]).await;
        let ev = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let ev = sup.journal().events();
                if ev.len() == 2 {
                    return ev;
                }
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("both exits");
        assert!(ev.iter().any(|e| e.child == "killme" && e.reason == ExitReason::Killed));
        assert!(ev.iter().any(|e| e.child == "stopme" && e.reason == ExitReason::Stopped));
        assert!(
            rx.try_recv().is_err(),
            "kill abandoned the slow message and ran no stopped hook; Work(9) stayed queued"
        );
        assert_eq!(s_addr.queue_len(), 1, "stop leaves queued messages in the mailbox");
        sup.shutdown().await;
    });
}

#[test]
fn bounded_mailbox_applies_back_pressure() {
    in_actix(async {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (s, addr) = ChildSpec::actor("slow", Restart::Permanent, 2, {
            let tx = tx.clone();
            move || Probe { name: "slow", tx: tx.clone() }
        });
        let sup = Supervisor::new("p", Strategy::OneForOne, Intensity::default()).child(s).start();
        expect(&mut rx, &[("slow", "started")]).await;
        let gate = std::sync::Arc::new(tokio::sync::Notify::new());
        addr.send(Msg::Gate(gate.clone())).await.expect("send");
        expect(&mut rx, &[("slow", "gate start")]).await;
        addr.send(Msg::Work(1)).await.expect("send");
        addr.send(Msg::Work(2)).await.expect("send");
        match addr.try_send(Msg::Work(3)) {
            Err(aion::runtime::actor::TrySendError::Full(Msg::Work(3))) => {}
            other => panic!("expected Full with the message back, got {other:?}"),
        }
        gate.notify_one();
        expect(&mut rx, &[("slow", "gate done"), ("slow", "work 1"), ("slow", "work 2")]).await;
        sup.shutdown().await;
    });
}
