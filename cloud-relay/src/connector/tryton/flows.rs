//! Driving documents to the state their events ask for: the transitions each flow takes from
//! each state, one job per event, and the batched calls (create, date, transition) with their
//! one-record-at-a-time fallback. Tryton runs a call in one transaction, so when it refuses a
//! batch nothing of it is kept, and repeating the step per record finds the event it refuses
//! while the others go on.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use serde_json::{Map, Value, json};
use time::Date;

use super::Inner;
use super::dates::{date_value, with_dates};
use super::master_data::Prepared;
use super::rpc::{RpcError, records};
use crate::connector::Delivery;

/// Transition rounds before a document that does not settle is reported as transient.
const MAX_ROUNDS: usize = 12;

impl Inner {
    /// Creates the records (one call, or one per record when the batch is refused) and adds a
    /// draft job for each; refusals go to `out`.
    pub(super) async fn create_jobs(
        &self,
        model: &'static str,
        records: Vec<Create>,
        jobs: &mut Vec<Job>,
        out: &mut Vec<(usize, Delivery)>,
        label_field: &str,
    ) {
        if records.is_empty() {
            return;
        }
        let method = format!("model.{model}.create");
        let labels: Vec<String> = records
            .iter()
            .map(|record| {
                let reference = record.values.get("reference").and_then(Value::as_str);
                match reference {
                    Some(r) if !label_field.is_empty() => format!("{label_field} {r}"),
                    _ => String::new(),
                }
            })
            .collect();
        let values: Vec<Value> = records.iter().map(|r| r.values.clone()).collect();
        let batch = self.rpc.call(&method, vec![Value::Array(values)]).await;
        let per_record: Vec<Result<i64, RpcError>> = match batch {
            Ok(ids) => match ids.as_array() {
                Some(ids) if ids.len() == records.len() => ids
                    .iter()
                    .map(|id| {
                        id.as_i64()
                            .ok_or_else(|| RpcError::Request(format!("{method} answered {id}")))
                    })
                    .collect(),
                _ => {
                    let e = RpcError::Request(format!("{method} answered {ids}"));
                    records.iter().map(|_| Err(e.clone())).collect()
                }
            },
            Err(RpcError::User(_)) if records.len() > 1 => {
                let mut each = Vec::new();
                for record in &records {
                    let one = self.rpc.call(&method, vec![json!([record.values])]).await;
                    each.push(one.and_then(|ids| {
                        ids.as_array()
                            .and_then(|a| a.first())
                            .and_then(Value::as_i64)
                            .ok_or_else(|| RpcError::Request(format!("{method} answered {ids}")))
                    }));
                }
                each
            }
            Err(e) => records.iter().map(|_| Err(e.clone())).collect(),
        };
        for ((record, result), label) in records.iter().zip(per_record).zip(labels) {
            match result {
                Ok(id) => jobs.push(Job::dated(
                    record.idx,
                    record.date,
                    id,
                    "draft".into(),
                    &label,
                )),
                Err(e) => out.push((
                    record.idx,
                    e.delivery(&format!("creating the {model} dated {}", record.date)),
                )),
            }
        }
    }

    /// Calls the transitions each job still needs, several jobs per call, reading the states
    /// back after each round, until every job reached its target, failed or waits for stock.
    pub(super) async fn drive(&self, flow: Flow, mut jobs: Vec<Job>) -> Vec<(usize, Delivery)> {
        let model = flow.model();
        let mut out = Vec::new();
        for _ in 0..MAX_ROUNDS {
            // Settle the jobs that need no call, group the others by transition.
            let mut calls: BTreeMap<&'static str, Vec<usize>> = BTreeMap::new();
            for (j, job) in jobs.iter_mut().enumerate() {
                if job.outcome.is_some() {
                    continue;
                }
                let outcome = match flow.next_step(&job.state, job.tried_assign) {
                    // A document that still needs a transition would book moves on its date.
                    Step::Call(method) => match job.closed.take() {
                        Some(refusal) => refusal,
                        None => {
                            calls.entry(method).or_default().push(j);
                            continue;
                        }
                    },
                    Step::Reached => Delivery::Posted {
                        erp_ref: format!("{model}/{}", job.id),
                    },
                    Step::Stuck => Delivery::Waiting {
                        reason: format!(
                            "waiting for stock: Tryton cannot reserve the stock for {} \
                             ({model}/{} stays waiting)",
                            job.describe(flow),
                            job.id
                        ),
                        retry_after: Duration::from_millis(self.config.waiting_retry_ms),
                    },
                    Step::Refused(why) => Delivery::Permanent {
                        reason: format!("{} ({model}/{}) {why}", job.describe(flow), job.id),
                    },
                };
                job.outcome = Some(outcome);
            }
            self.date_jobs(flow, &mut jobs, &mut calls).await;
            if calls.is_empty() {
                break;
            }
            // Jobs whose next state Tryton decides (assign_try): read back after the calls.
            let mut to_read: Vec<usize> = Vec::new();
            for (method, members) in calls {
                let ids: Vec<i64> = {
                    let mut seen = HashSet::new();
                    members
                        .iter()
                        .map(|j| jobs[*j].id)
                        .filter(|id| seen.insert(*id))
                        .collect()
                };
                let results = self.call_each(model, method, &ids).await;
                for j in members {
                    let job = &mut jobs[j];
                    if matches!(method, "assign_try" | "assign_force") {
                        job.tried_assign = true;
                    }
                    match results.get(&job.id) {
                        Some(Err(e)) => {
                            let what = format!("{method} on {model}/{} dated {}", job.id, job.date);
                            job.outcome = Some(e.delivery(&what));
                        }
                        _ => match state_after(method) {
                            Some(state) => job.state = state.to_string(),
                            None => to_read.push(j),
                        },
                    }
                }
            }
            if to_read.is_empty() {
                continue;
            }
            let ids: Vec<i64> = {
                let mut seen = HashSet::new();
                to_read
                    .iter()
                    .map(|j| jobs[*j].id)
                    .filter(|id| seen.insert(*id))
                    .collect()
            };
            let states = self
                .rpc
                .call(
                    &format!("model.{model}.read"),
                    vec![json!(ids), json!(["state"])],
                )
                .await;
            match states {
                Ok(states) => {
                    let states: HashMap<i64, String> = records(&states)
                        .iter()
                        .filter_map(|r| {
                            Some((
                                r.get("id")?.as_i64()?,
                                r.get("state")?.as_str()?.to_string(),
                            ))
                        })
                        .collect();
                    for j in to_read {
                        if let Some(state) = states.get(&jobs[j].id) {
                            jobs[j].state = state.clone();
                        }
                    }
                }
                Err(e) => {
                    for j in to_read {
                        jobs[j].outcome = Some(e.delivery(&format!("reading {model} states")));
                    }
                }
            }
        }
        for job in jobs {
            let delivery = job.outcome.unwrap_or_else(|| Delivery::Transient {
                reason: format!(
                    "{model}/{} did not reach its state in {MAX_ROUNDS} rounds (state {})",
                    job.id, job.state
                ),
                retry_after: None,
            });
            out.push((job.idx, delivery));
        }
        out
    }

    /// Dates the documents of the jobs about to be called, before the transitions book their
    /// moves: a document found rather than created in this delivery gets its date fields before
    /// its first transition, and a pick dates the inventory moves of its customer shipment just
    /// before `pick`. A job whose dating fails leaves the round with that failure.
    async fn date_jobs(
        &self,
        flow: Flow,
        jobs: &mut [Job],
        calls: &mut BTreeMap<&'static str, Vec<usize>>,
    ) {
        let model = flow.model();
        let undated: Vec<usize> = calls
            .values()
            .flatten()
            .copied()
            .filter(|j| !jobs[*j].dated && flow.found_dates(jobs[*j].date).is_some())
            .collect();
        if !undated.is_empty() {
            let targets = date_targets(jobs, &undated);
            let written = self
                .write_dates(model, &targets, |date| {
                    Value::Object(flow.found_dates(date).unwrap_or_default())
                })
                .await;
            for j in undated {
                let job = &mut jobs[j];
                match written.get(&job.id) {
                    Some(Err(e)) => {
                        let what = format!("dating {model}/{} {}", job.id, job.date);
                        job.outcome = Some(e.delivery(&what));
                    }
                    _ => job.dated = true,
                }
            }
        }
        if flow == Flow::Pick
            && let Some(members) = calls.get("pick")
        {
            let picking: Vec<usize> = members
                .iter()
                .copied()
                .filter(|j| jobs[*j].outcome.is_none())
                .collect();
            let written = self
                .date_inventory_moves(&date_targets(jobs, &picking))
                .await;
            for j in picking {
                let job = &mut jobs[j];
                if let Some(Err(e)) = written.get(&job.id) {
                    let what = format!(
                        "dating the inventory moves of {model}/{} {}",
                        job.id, job.date
                    );
                    job.outcome = Some(e.delivery(&what));
                }
            }
        }
        for members in calls.values_mut() {
            members.retain(|j| jobs[*j].outcome.is_none());
        }
        calls.retain(|_, members| !members.is_empty());
    }

    /// Dates the inventory moves (storage to output) of customer shipments about to be picked:
    /// the moves still assigned, which `pick` books; Tryton keeps a date a move already has.
    async fn date_inventory_moves(
        &self,
        shipments: &[(i64, Date)],
    ) -> HashMap<i64, Result<(), RpcError>> {
        if shipments.is_empty() {
            return HashMap::new();
        }
        let shipment_model = Flow::Pick.model();
        let refs: Vec<String> = shipments
            .iter()
            .map(|(id, _)| format!("{shipment_model},{id}"))
            .collect();
        let found = self
            .rpc
            .call(
                "model.stock.move.search_read",
                vec![
                    json!([["shipment", "in", refs], ["state", "=", "assigned"]]),
                    json!(0),
                    Value::Null,
                    Value::Null,
                    json!(["shipment"]),
                ],
            )
            .await;
        let found = match found {
            Ok(found) => found,
            Err(e) => {
                return shipments
                    .iter()
                    .map(|(id, _)| (*id, Err(e.clone())))
                    .collect();
            }
        };
        let date_of: HashMap<i64, Date> = shipments.iter().copied().collect();
        let mut moves: Vec<(i64, Date)> = Vec::new();
        let mut shipment_of: HashMap<i64, i64> = HashMap::new();
        for record in records(&found) {
            let shipment = record
                .get("shipment")
                .and_then(Value::as_str)
                .and_then(|r| r.strip_prefix(shipment_model))
                .and_then(|r| r.strip_prefix(','))
                .and_then(|id| id.parse::<i64>().ok());
            let (Some(id), Some(shipment)) = (record.get("id").and_then(Value::as_i64), shipment)
            else {
                continue;
            };
            if let Some(date) = date_of.get(&shipment) {
                moves.push((id, *date));
                shipment_of.insert(id, shipment);
            }
        }
        let written = self
            .write_dates(
                "stock.move",
                &moves,
                |date| json!({"effective_date": date_value(date)}),
            )
            .await;
        let mut out: HashMap<i64, Result<(), RpcError>> =
            shipments.iter().map(|(id, _)| (*id, Ok(()))).collect();
        for (move_id, result) in written {
            if let (Err(e), Some(shipment)) = (result, shipment_of.get(&move_id)) {
                out.insert(*shipment, Err(e));
            }
        }
        out
    }

    /// Writes date fields on records of `model`, one call for all (grouped by date); when
    /// Tryton refuses the batch, once per record to find which it refuses.
    async fn write_dates(
        &self,
        model: &str,
        targets: &[(i64, Date)],
        values: impl Fn(Date) -> Value,
    ) -> HashMap<i64, Result<(), RpcError>> {
        if targets.is_empty() {
            return HashMap::new();
        }
        let method = format!("model.{model}.write");
        let mut by_date: BTreeMap<Date, Vec<i64>> = BTreeMap::new();
        for (id, date) in targets {
            by_date.entry(*date).or_default().push(*id);
        }
        let mut params = Vec::new();
        for (date, ids) in &by_date {
            params.push(json!(ids));
            params.push(values(*date));
        }
        match self.rpc.call(&method, params).await {
            Ok(_) => targets.iter().map(|(id, _)| (*id, Ok(()))).collect(),
            Err(RpcError::User(_)) if targets.len() > 1 => {
                let mut each = HashMap::new();
                for (id, date) in targets {
                    let one = self
                        .rpc
                        .call(&method, vec![json!([id]), values(*date)])
                        .await;
                    each.insert(*id, one.map(|_| ()));
                }
                each
            }
            Err(e) => targets
                .iter()
                .map(|(id, _)| (*id, Err(e.clone())))
                .collect(),
        }
    }

    /// Calls a transition on all the ids at once; when Tryton refuses the batch, once per id to
    /// find which it refuses.
    async fn call_each(
        &self,
        model: &str,
        method: &str,
        ids: &[i64],
    ) -> HashMap<i64, Result<(), RpcError>> {
        let full = format!("model.{model}.{method}");
        match self.rpc.call(&full, vec![json!(ids)]).await {
            Ok(_) => ids.iter().map(|id| (*id, Ok(()))).collect(),
            Err(RpcError::User(_)) if ids.len() > 1 => {
                let mut each = HashMap::new();
                for id in ids {
                    let one = self.rpc.call(&full, vec![json!([id])]).await.map(|_| ());
                    each.insert(*id, one);
                }
                each
            }
            Err(e) => ids.iter().map(|id| (*id, Err(e.clone()))).collect(),
        }
    }
}

/// A document to create for one event, with its date fields.
pub(super) struct Create {
    idx: usize,
    date: Date,
    values: Value,
}

impl Create {
    pub(super) fn new(flow: Flow, item: &Prepared<'_>, values: Value) -> Create {
        Create {
            idx: item.idx,
            date: item.date,
            values: with_dates(values, Some(flow.created_dates(item.date))),
        }
    }
}

/// One event's document on its way to the state its event asks for.
pub(super) struct Job {
    idx: usize,
    id: i64,
    state: String,
    tried_assign: bool,
    label: String,
    outcome: Option<Delivery>,
    /// The date the event's moves are booked on.
    date: Date,
    /// Whether the document already has its date fields (it was made or extended by this
    /// delivery); otherwise they are written before its first transition.
    dated: bool,
    /// The refusal of a date in a closed stock period, given if a transition is needed.
    closed: Option<Delivery>,
}

impl Job {
    /// A job on a document found in Tryton for the event.
    pub(super) fn found(item: &Prepared<'_>, id: i64, state: String, label: &str) -> Job {
        Job {
            idx: item.idx,
            id,
            state,
            tried_assign: false,
            label: label.to_string(),
            outcome: None,
            date: item.date,
            dated: false,
            closed: item.closed.clone(),
        }
    }

    /// A job on a document this delivery created or extended with its date fields, after
    /// checking the date against the closed periods.
    pub(super) fn dated(idx: usize, date: Date, id: i64, state: String, label: &str) -> Job {
        Job {
            idx,
            id,
            state,
            tried_assign: false,
            label: label.to_string(),
            outcome: None,
            date,
            dated: true,
            closed: None,
        }
    }

    fn describe(&self, flow: Flow) -> String {
        let what = match flow {
            Flow::Adjust => "the internal shipment",
            Flow::Count => "the inventory",
            Flow::Receive => "the supplier shipment",
            Flow::Pick | Flow::Ship => "the customer shipment",
        };
        if self.label.is_empty() {
            what.to_string()
        } else {
            format!("{what} of {}", self.label)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Flow {
    Adjust,
    Count,
    Receive,
    Pick,
    Ship,
}

enum Step {
    Reached,
    Call(&'static str),
    /// Waiting for stock Tryton cannot reserve.
    Stuck,
    Refused(&'static str),
}

impl Flow {
    pub(super) fn model(self) -> &'static str {
        match self {
            Flow::Adjust => "stock.shipment.internal",
            Flow::Count => "stock.inventory",
            Flow::Receive => "stock.shipment.in",
            Flow::Pick | Flow::Ship => "stock.shipment.out",
        }
    }

    /// The date fields of a document created for an event of this flow. Tryton copies a
    /// shipment's planned date onto its moves, where it checks closed stock periods.
    fn created_dates(self, date: Date) -> Map<String, Value> {
        let date = date_value(date);
        let fields: &[&str] = match self {
            // Tryton requires a planned start date with an internal shipment's planned date.
            Flow::Adjust => &["effective_date", "planned_date", "planned_start_date"],
            Flow::Receive | Flow::Ship => &["effective_date", "planned_date"],
            Flow::Pick => &["planned_date"],
            Flow::Count => &["date"],
        };
        fields
            .iter()
            .map(|field| (field.to_string(), date.clone()))
            .collect()
    }

    /// The date fields written on a document found for the event (or extended with a line of
    /// it) before its first transition; none for a pick, which dates the moves it picks. A
    /// customer shipment keeps the planned date the ERP gave it.
    pub(super) fn found_dates(self, date: Date) -> Option<Map<String, Value>> {
        match self {
            Flow::Pick => None,
            Flow::Ship => {
                let mut fields = Map::new();
                fields.insert("effective_date".into(), date_value(date));
                Some(fields)
            }
            Flow::Adjust | Flow::Receive | Flow::Count => Some(self.created_dates(date)),
        }
    }

    /// What a document of this flow in `state` needs next.
    fn next_step(self, state: &str, tried_assign: bool) -> Step {
        const CANCELLED: &str = "is cancelled in Tryton";
        match (self, state) {
            (_, "cancelled") => Step::Refused(CANCELLED),
            (Flow::Count, "draft") => Step::Call("confirm"),
            (Flow::Count, "done") => Step::Reached,
            (Flow::Receive, "draft") => Step::Call("receive"),
            (Flow::Receive, "received") => Step::Call("do"),
            (Flow::Receive, "done") => Step::Reached,
            (Flow::Adjust, "request") => Step::Call("draft"),
            (Flow::Adjust | Flow::Pick | Flow::Ship, "draft") => Step::Call("wait"),
            (Flow::Adjust | Flow::Pick | Flow::Ship, "waiting") if !tried_assign => {
                Step::Call("assign_try")
            }
            (Flow::Adjust, "waiting") => Step::Call("assign_force"),
            (Flow::Pick | Flow::Ship, "waiting") => Step::Stuck,
            (Flow::Adjust, "assigned") => Step::Call("do"),
            (Flow::Adjust, "packed") => Step::Call("ship"),
            (Flow::Adjust, "shipped") => Step::Call("do"),
            (Flow::Adjust, "done") => Step::Reached,
            (Flow::Pick | Flow::Ship, "assigned") => Step::Call("pick"),
            (Flow::Pick, "picked" | "packed" | "shipped" | "done") => Step::Reached,
            (Flow::Ship, "picked") => Step::Call("pack"),
            (Flow::Ship, "packed" | "shipped") => Step::Call("do"),
            (Flow::Ship, "done") => Step::Reached,
            _ => Step::Refused("is in a state this connector does not handle"),
        }
    }
}

/// The state a transition leaves a document in when Tryton accepts it; `None` when Tryton
/// decides (`assign_try` reserves what it can and may leave the document waiting).
fn state_after(method: &str) -> Option<&'static str> {
    Some(match method {
        "draft" => "draft",
        "wait" => "waiting",
        "assign_force" => "assigned",
        "pick" => "picked",
        "pack" => "packed",
        "ship" => "shipped",
        "do" | "confirm" => "done",
        "receive" => "received",
        _ => return None,
    })
}

/// The distinct documents of these jobs with their dates (the latest, should two events of
/// one delivery share a document).
fn date_targets(jobs: &[Job], members: &[usize]) -> Vec<(i64, Date)> {
    let mut by_id: BTreeMap<i64, Date> = BTreeMap::new();
    for j in members {
        let job = &jobs[*j];
        let date = by_id.entry(job.id).or_insert(job.date);
        *date = (*date).max(job.date);
    }
    by_id.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn date(year: i32, month: u8, day: u8) -> Date {
        let month = time::Month::try_from(month).unwrap();
        Date::from_calendar_date(year, month, day).unwrap()
    }

    #[test]
    fn date_fields_per_document() {
        let day = date(2026, 11, 12);
        let keys = |fields: Map<String, Value>| fields.keys().cloned().collect::<Vec<_>>();
        assert_eq!(
            keys(Flow::Adjust.created_dates(day)),
            ["effective_date", "planned_date", "planned_start_date"]
        );
        assert_eq!(keys(Flow::Count.created_dates(day)), ["date"]);
        assert_eq!(keys(Flow::Pick.created_dates(day)), ["planned_date"]);
        assert_eq!(Flow::Pick.found_dates(day), None);
        // A customer shipment the ERP planned keeps its planned date.
        assert_eq!(
            Flow::Ship.found_dates(day).map(keys),
            Some(vec!["effective_date".to_string()])
        );
        let values = with_dates(json!({"reference": "r"}), Flow::Ship.found_dates(day));
        assert_eq!(values["effective_date"], date_value(day));
        assert_eq!(values["reference"], "r");
    }

    #[test]
    fn ship_and_pick_steps() {
        assert!(matches!(Flow::Pick.next_step("done", false), Step::Reached));
        assert!(matches!(Flow::Pick.next_step("waiting", true), Step::Stuck));
        assert!(matches!(
            Flow::Adjust.next_step("waiting", true),
            Step::Call("assign_force")
        ));
        assert!(matches!(
            Flow::Ship.next_step("picked", false),
            Step::Call("pack")
        ));
        assert!(matches!(
            Flow::Receive.next_step("cancelled", false),
            Step::Refused(_)
        ));
    }
}
