//! What the mock ERP keeps: sales orders, credit notes, the first answer
//! of every `Idempotency-Key`, the scripted faults, and every request it
//! saw. All in memory, behind one lock (requests are short and few).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A sales order, as the ERP stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SalesOrder {
    /// The ERP's id (`SO-000001`).
    pub id: String,
    /// The CRM's order id: one sales order per CRM order.
    pub crm_order_id: String,
    /// The customer.
    pub customer_id: String,
    /// Payment terms (`NET30`).
    pub payment_terms: String,
    /// The total, as sent.
    pub total: String,
    /// The currency, when sent.
    pub currency: Option<String>,
    /// The CRM order's version this sales order reflects.
    pub version: u64,
}

/// A credit note.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreditNote {
    /// The ERP's id (`CN-000001`).
    pub id: String,
    /// The sales order it credits.
    pub sales_order_id: String,
    /// The CRM return it answers, when sent.
    pub return_id: Option<String>,
    /// The amount, as sent.
    pub amount: Option<String>,
    /// The reason, as sent.
    pub reason: Option<String>,
}

/// A scripted fault: the next `times` requests to `path` (or any path,
/// `"*"`) are answered `status` after `delay_ms` — or, without a
/// `status`, handled as usual and answered only after `delay_ms` (the ERP
/// did the work and is slow to say so).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// The path it applies to, e.g. `/sales-orders`; `*` for every path
    /// except `/_mock/…`.
    #[serde(default = "any_path")]
    pub path: String,
    /// How many requests it applies to.
    #[serde(default = "once")]
    pub times: u32,
    /// The status to answer instead of handling the request.
    #[serde(default)]
    pub status: Option<u16>,
    /// A `Retry-After` to send with it (seconds or an HTTP date).
    #[serde(default)]
    pub retry_after: Option<String>,
    /// The body to answer with (default: `{"error": "…"}`).
    #[serde(default)]
    pub body: Option<Value>,
    /// A `Location` to send with it (a redirect).
    #[serde(default)]
    pub location: Option<String>,
    /// How long to wait before answering, in milliseconds.
    #[serde(default)]
    pub delay_ms: u64,
}

fn any_path() -> String {
    "*".into()
}

fn once() -> u32 {
    1
}

impl Fault {
    /// `status` for the next `times` requests to `path`.
    pub fn status(path: &str, status: u16, times: u32) -> Fault {
        Fault {
            path: path.into(),
            times,
            status: Some(status),
            retry_after: None,
            body: None,
            location: None,
            delay_ms: 0,
        }
    }

    /// The next `times` requests to `path` are handled, then answered
    /// after `delay`.
    pub fn slow(path: &str, delay: Duration, times: u32) -> Fault {
        Fault {
            status: None,
            delay_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            ..Fault::status(path, 0, times)
        }
    }

    /// With a `Retry-After`.
    pub fn retry_after(mut self, value: &str) -> Fault {
        self.retry_after = Some(value.into());
        self
    }

    /// With a `Location`.
    pub fn location(mut self, value: &str) -> Fault {
        self.location = Some(value.into());
        self
    }

    /// With this body.
    pub fn body(mut self, value: Value) -> Fault {
        self.body = Some(value);
        self
    }
}

/// One request the ERP saw, and how it answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Seen {
    /// When it was handled (Unix milliseconds), before any scripted delay.
    pub at_ms: u64,
    /// The request.
    #[serde(flatten)]
    pub request: Incoming,
    /// The status answered.
    pub status: u16,
    /// Whether the answer was the stored first answer of its key.
    pub replayed: bool,
}

/// An answer: status and JSON body, plus a few headers.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The status.
    pub status: u16,
    /// The body.
    pub body: Value,
    /// `Retry-After`, when set.
    pub retry_after: Option<String>,
    /// `Location`, when set.
    pub location: Option<String>,
    /// Whether it is the stored first answer of its idempotency key.
    pub replayed: bool,
}

impl Answer {
    /// A JSON answer.
    pub fn json(status: u16, body: Value) -> Answer {
        Answer {
            status,
            body,
            retry_after: None,
            location: None,
            replayed: false,
        }
    }

    /// `{"error": message}`.
    pub fn error(status: u16, message: impl Into<String>) -> Answer {
        Answer::json(status, serde_json::json!({ "error": message.into() }))
    }
}

/// The first answer given for an idempotency key, and the request it
/// answered (a key reused for another request is refused).
#[derive(Debug, Clone)]
struct Remembered {
    request: (String, String, Value),
    answer: Answer,
}

/// The business data: what the ERP's endpoints change.
#[derive(Debug, Default)]
pub struct Books {
    orders: BTreeMap<String, SalesOrder>,
    credit_notes: Vec<CreditNote>,
    next_order: u64,
}

#[derive(Debug, Default)]
struct State {
    books: Books,
    keys: BTreeMap<String, Remembered>,
    faults: VecDeque<Fault>,
    seen: Vec<Seen>,
}

/// The ERP's data. Cheap to share behind an `Arc`; every method takes the
/// one lock briefly.
#[derive(Debug, Default)]
pub struct Erp {
    state: Mutex<State>,
}

/// What a request said about itself, for the log.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Incoming {
    /// The method.
    pub method: String,
    /// The path.
    pub path: String,
    /// `Idempotency-Key`.
    pub idempotency_key: Option<String>,
    /// `traceparent`.
    pub traceparent: Option<String>,
    /// `X-Correlation-Id`.
    pub correlation_id: Option<String>,
    /// `Authorization` (this is a development ERP: it shows what it got).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<String>,
}

/// What to do with a request before handling it.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Answer this, after the delay, without handling the request.
    Fail(Answer, Duration),
    /// Handle it, then wait this long before answering.
    Handle(Duration),
}

impl Erp {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a fault (after those already queued).
    pub fn script(&self, fault: Fault) {
        self.lock().faults.push_back(fault);
    }

    /// Drops every queued fault.
    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// Forgets everything: orders, credit notes, keys, faults, the log.
    pub fn reset(&self) {
        *self.lock() = State::default();
    }

    /// Every sales order, by id.
    pub fn sales_orders(&self) -> Vec<SalesOrder> {
        self.lock().books.orders.values().cloned().collect()
    }

    /// Every credit note, oldest first.
    pub fn credit_notes(&self) -> Vec<CreditNote> {
        self.lock().books.credit_notes.clone()
    }

    /// One sales order.
    pub fn order(&self, id: &str) -> Option<SalesOrder> {
        self.lock().books.orders.get(id).cloned()
    }

    /// Every request seen, oldest first.
    pub fn requests(&self) -> Vec<Seen> {
        self.lock().seen.clone()
    }

    /// The fault that applies to a request to `path`, used up by one.
    pub fn plan(&self, path: &str) -> Plan {
        let mut state = self.lock();
        let Some(index) = state
            .faults
            .iter()
            .position(|f| f.times > 0 && (f.path == "*" || f.path == path))
        else {
            return Plan::Handle(Duration::ZERO);
        };
        let fault = state.faults[index].clone();
        state.faults[index].times -= 1;
        if state.faults[index].times == 0 {
            state.faults.remove(index);
        }
        let delay = Duration::from_millis(fault.delay_ms);
        match fault.status {
            None => Plan::Handle(delay),
            Some(status) => Plan::Fail(
                Answer {
                    status,
                    body: fault.body.unwrap_or_else(
                        || serde_json::json!({ "error": format!("mock ERP: scripted {status}") }),
                    ),
                    retry_after: fault.retry_after,
                    location: fault.location,
                    replayed: false,
                },
                delay,
            ),
        }
    }

    /// Records that `incoming` was answered `answer`.
    pub fn saw(&self, incoming: &Incoming, answer: &Answer) {
        let at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.lock().seen.push(Seen {
            at_ms,
            request: incoming.clone(),
            status: answer.status,
            replayed: answer.replayed,
        });
    }

    /// Handles a write once per idempotency key: the first answer is
    /// stored, and a request with the same key gets it again without
    /// effect (`replayed`); the same key on a different request is a 422.
    /// Without a key, every request is handled. Check, handling and
    /// storing the answer happen under one lock, so two requests racing
    /// with one key still have one effect.
    pub fn once_per_key(
        &self,
        key: Option<&str>,
        request: (String, String, Value),
        handle: impl FnOnce(&mut Books) -> Answer,
    ) -> Answer {
        let mut state = self.lock();
        let Some(key) = key else {
            return handle(&mut state.books);
        };
        if let Some(remembered) = state.keys.get(key) {
            if remembered.request != request {
                return Answer::error(
                    422,
                    format!("Idempotency-Key {key:?} was used for a different request"),
                );
            }
            let mut answer = remembered.answer.clone();
            answer.replayed = true;
            return answer;
        }
        let answer = handle(&mut state.books);
        state.keys.insert(
            key.to_string(),
            Remembered {
                request,
                answer: answer.clone(),
            },
        );
        answer
    }
}

/// A field of a JSON body as text: a non-empty string, or a number.
fn text(body: &Value, field: &str) -> Option<String> {
    match body.get(field) {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    }
}

impl Books {
    /// `POST /sales-orders`: creates the CRM order's sales order (201), or
    /// updates it to a newer version (200; an older version changes
    /// nothing).
    pub fn upsert_order(&mut self, body: &Value) -> Answer {
        let mut missing = Vec::new();
        let mut required = |field: &'static str| {
            text(body, field).unwrap_or_else(|| {
                missing.push(field);
                String::new()
            })
        };
        let crm_order_id = required("crm_order_id");
        let customer_id = required("customer_id");
        let payment_terms = required("payment_terms");
        let total = required("total");
        let version = body.get("version").and_then(|v| {
            v.as_u64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        });
        if version.is_none() {
            missing.push("version");
        }
        if !missing.is_empty() {
            return Answer::error(422, format!("missing or empty: {}", missing.join(", ")));
        }
        let version = version.unwrap_or_default();
        let currency = text(body, "currency");
        if let Some(order) = self
            .orders
            .values_mut()
            .find(|o| o.crm_order_id == crm_order_id)
        {
            if version >= order.version {
                *order = SalesOrder {
                    id: order.id.clone(),
                    crm_order_id,
                    customer_id,
                    payment_terms,
                    total,
                    currency,
                    version,
                };
            }
            return Answer::json(200, serde_json::to_value(&*order).unwrap_or_default());
        }
        self.next_order += 1;
        let order = SalesOrder {
            id: format!("SO-{:06}", self.next_order),
            crm_order_id,
            customer_id,
            payment_terms,
            total,
            currency,
            version,
        };
        let answer = Answer::json(201, serde_json::to_value(&order).unwrap_or_default());
        self.orders.insert(order.id.clone(), order);
        answer
    }

    /// `POST /credit-notes`: a credit note for an existing sales order
    /// (201), else 422.
    pub fn credit(&mut self, body: &Value) -> Answer {
        let Some(sales_order_id) = text(body, "sales_order_id") else {
            return Answer::error(422, "missing or empty: sales_order_id");
        };
        if !self.orders.contains_key(&sales_order_id) {
            return Answer::error(422, format!("no sales order {sales_order_id}"));
        }
        let note = CreditNote {
            id: format!("CN-{:06}", self.credit_notes.len() + 1),
            sales_order_id,
            return_id: text(body, "return_id"),
            amount: text(body, "amount"),
            reason: text(body, "reason"),
        };
        let answer = Answer::json(201, serde_json::to_value(&note).unwrap_or_default());
        self.credit_notes.push(note);
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn order(id: &str, version: u64) -> Value {
        json!({"crm_order_id": id, "customer_id": "C-1", "payment_terms": "NET30", "total": "10.00", "version": version})
    }

    fn post(erp: &Erp, key: Option<&str>, body: Value) -> Answer {
        let request = ("POST".into(), "/sales-orders".into(), body.clone());
        erp.once_per_key(key, request, |books| books.upsert_order(&body))
    }

    #[test]
    fn a_repeated_key_gets_the_first_answer_and_changes_nothing() {
        let erp = Erp::default();
        let first = post(&erp, Some("k-1"), order("ORD-1", 1));
        assert_eq!(first.status, 201);
        assert_eq!(first.body["id"], "SO-000001");
        let again = post(&erp, Some("k-1"), order("ORD-1", 1));
        assert_eq!((again.status, again.replayed), (201, true));
        assert_eq!(again.body, first.body);
        assert_eq!(erp.sales_orders().len(), 1);
        let misuse = post(&erp, Some("k-1"), order("ORD-2", 1));
        assert_eq!(misuse.status, 422);
        assert_eq!(erp.sales_orders().len(), 1);
    }

    #[test]
    fn orders_are_upserted_by_crm_id_and_never_go_back_a_version() {
        let erp = Erp::default();
        post(&erp, None, order("ORD-1", 2));
        let older = post(&erp, None, order("ORD-1", 1));
        assert_eq!(
            (older.status, older.body["version"].as_u64()),
            (200, Some(2))
        );
        let newer = post(&erp, None, order("ORD-1", 3));
        assert_eq!(newer.body["id"], "SO-000001");
        assert_eq!(erp.sales_orders()[0].version, 3);
        let bad = post(&erp, None, json!({"crm_order_id": "ORD-9"}));
        assert_eq!(bad.status, 422);
        assert!(
            bad.body["error"]
                .as_str()
                .unwrap_or("")
                .contains("customer_id")
        );
    }

    #[test]
    fn faults_apply_in_order_and_run_out() {
        let erp = Erp::default();
        erp.script(Fault::status("/sales-orders", 500, 2));
        erp.script(Fault::status("*", 429, 1).retry_after("2"));
        assert!(matches!(erp.plan("/credit-notes"), Plan::Fail(a, _) if a.status == 429));
        assert!(matches!(erp.plan("/sales-orders"), Plan::Fail(a, _) if a.status == 500));
        assert!(matches!(erp.plan("/sales-orders"), Plan::Fail(a, _) if a.status == 500));
        assert_eq!(erp.plan("/sales-orders"), Plan::Handle(Duration::ZERO));
        erp.script(Fault::slow("/sales-orders", Duration::from_secs(3), 1));
        assert_eq!(
            erp.plan("/sales-orders"),
            Plan::Handle(Duration::from_secs(3))
        );
    }

    #[test]
    fn credit_notes_need_an_existing_sales_order() {
        let erp = Erp::default();
        post(&erp, None, order("ORD-1", 1));
        let request = ("POST".into(), "/credit-notes".into(), json!({}));
        let missing = erp.once_per_key(None, request.clone(), |books| {
            books.credit(&json!({"sales_order_id": "SO-000009"}))
        });
        assert_eq!(missing.status, 422);
        let note = erp.once_per_key(None, request, |books| {
            books.credit(&json!({"sales_order_id": "SO-000001", "amount": "5"}))
        });
        assert_eq!(
            (note.status, note.body["id"].as_str()),
            (201, Some("CN-000001"))
        );
    }
}
