//! What each event type becomes in Tryton: an adjustment's internal shipment, a count's
//! inventory, a receipt's supplier shipment, and the customer shipment of its order for a
//! pick or ship. Each group of events is searched by its idempotency key first, so a repeated
//! delivery finds its document instead of making a second one; only the missing documents are
//! created (or an open shipment of the order gets the new line), and the flows drive them all.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::{Map, Value, json};
use time::Date;

use super::Inner;
use super::dates::with_dates;
use super::flows::{Create, Flow, Job};
use super::master_data::{Prepared, Setup};
use super::rpc::{RpcError, id_field, ids_field, quantity, records};
use crate::connector::Delivery;

impl Inner {
    // ----- adjust ----------------------------------------------------------------------------

    pub(super) async fn adjust(
        &self,
        setup: &Setup,
        items: Vec<Prepared<'_>>,
    ) -> Vec<(usize, Delivery)> {
        let model = Flow::Adjust.model();
        let existing = match self.find_by(model, "reference", &items).await {
            Ok(found) => found,
            Err(e) => return fail_all(&items, e.delivery("searching internal shipments")),
        };
        let mut out = Vec::new();
        let mut jobs = Vec::new();
        let mut to_create = Vec::new();
        for item in &items {
            if let Some((id, state)) = existing.get(&item.event.id) {
                jobs.push(Job::found(item, *id, state.clone(), ""));
                continue;
            }
            if let Some(closed) = &item.closed {
                out.push((item.idx, closed.clone()));
                continue;
            }
            let (from, to) = if item.event.qty.is_sign_negative() {
                (item.location, setup.lost_found)
            } else {
                (setup.lost_found, item.location)
            };
            let quantity = quantity(&item.event.qty.abs().to_string());
            to_create.push(Create::new(
                Flow::Adjust,
                item,
                json!({
                    "reference": item.event.id,
                    "company": self.config.company,
                    "from_location": from,
                    "to_location": to,
                    "moves": [["create", [{
                        "product": item.product.id,
                        "unit": item.product.uom,
                        "quantity": quantity,
                        "from_location": from,
                        "to_location": to,
                        "company": self.config.company,
                    }]]],
                }),
            ));
        }
        self.create_jobs(model, to_create, &mut jobs, &mut out, "")
            .await;
        out.extend(self.drive(Flow::Adjust, jobs).await);
        out
    }

    // ----- count -----------------------------------------------------------------------------

    pub(super) async fn count(&self, items: Vec<Prepared<'_>>) -> Vec<(usize, Delivery)> {
        let model = Flow::Count.model();
        let ids: Vec<&str> = items.iter().map(|i| i.event.id.as_str()).collect();
        let found = self
            .rpc
            .call(
                &format!("model.{model}.search_read"),
                vec![
                    json!([["number", "in", ids]]),
                    json!(0),
                    Value::Null,
                    Value::Null,
                    json!(["number", "state", "location"]),
                ],
            )
            .await;
        let found = match found {
            Ok(found) => found,
            Err(e) => return fail_all(&items, e.delivery("searching inventories")),
        };
        let mut out = Vec::new();
        let mut jobs = Vec::new();
        let mut to_create = Vec::new();
        for item in &items {
            let same_number: Vec<&Map<String, Value>> = records(&found)
                .into_iter()
                .filter(|r| r.get("number").and_then(Value::as_str) == Some(&item.event.id))
                .collect();
            if let Some(record) = same_number
                .iter()
                .find(|r| id_field(r, "location") == Some(item.location))
            {
                let (Some(id), Some(state)) = (
                    record.get("id").and_then(Value::as_i64),
                    record.get("state").and_then(Value::as_str),
                ) else {
                    out.push((item.idx, malformed("an inventory")));
                    continue;
                };
                jobs.push(Job::found(item, id, state.to_string(), ""));
            } else if !same_number.is_empty() {
                out.push((
                    item.idx,
                    Delivery::Permanent {
                        reason: format!(
                            "Tryton already has an inventory numbered {:?} at another location; \
                             this count cannot take that number",
                            item.event.id
                        ),
                    },
                ));
            } else if let Some(closed) = &item.closed {
                out.push((item.idx, closed.clone()));
            } else {
                to_create.push(Create::new(
                    Flow::Count,
                    item,
                    json!({
                        "number": item.event.id,
                        "location": item.location,
                        "company": self.config.company,
                        "lines": [["create", [{
                            "product": item.product.id,
                            "quantity": quantity(&item.event.qty.to_string()),
                        }]]],
                    }),
                ));
            }
        }
        self.create_jobs(model, to_create, &mut jobs, &mut out, "")
            .await;
        out.extend(self.drive(Flow::Count, jobs).await);
        out
    }

    // ----- receive ---------------------------------------------------------------------------

    pub(super) async fn receive(
        &self,
        setup: &Setup,
        items: Vec<Prepared<'_>>,
    ) -> Vec<(usize, Delivery)> {
        let model = Flow::Receive.model();
        let existing = match self.find_by(model, "reference", &items).await {
            Ok(found) => found,
            Err(e) => return fail_all(&items, e.delivery("searching supplier shipments")),
        };
        let mut out = Vec::new();
        let mut jobs = Vec::new();
        let mut to_create = Vec::new();
        for item in &items {
            if let Some((id, state)) = existing.get(&item.event.id) {
                jobs.push(Job::found(item, *id, state.clone(), ""));
                continue;
            }
            if let Some(closed) = &item.closed {
                out.push((item.idx, closed.clone()));
                continue;
            }
            let supplier = match &setup.supplier {
                Ok(supplier) => supplier,
                Err(why) => {
                    out.push((
                        item.idx,
                        Delivery::Permanent {
                            reason: format!("cannot create the receipt: {why}"),
                        },
                    ));
                    continue;
                }
            };
            to_create.push(Create::new(
                Flow::Receive,
                item,
                json!({
                    "reference": item.event.id,
                    "company": self.config.company,
                    "supplier": supplier.id,
                    "warehouse": setup.warehouse,
                    "warehouse_input": setup.input,
                    "warehouse_storage": item.location,
                    "incoming_moves": [["create", [{
                        "product": item.product.id,
                        "unit": item.product.uom,
                        "quantity": quantity(&item.event.qty.to_string()),
                        "from_location": supplier.supplier_location,
                        "to_location": setup.input,
                        "company": self.config.company,
                        "unit_price": item.product.cost_price,
                        "currency": setup.currency,
                    }]]],
                }),
            ));
        }
        self.create_jobs(model, to_create, &mut jobs, &mut out, "")
            .await;
        out.extend(self.drive(Flow::Receive, jobs).await);
        out
    }

    // ----- pick and ship ---------------------------------------------------------------------

    pub(super) async fn order_events(
        &self,
        setup: &Setup,
        items: Vec<Prepared<'_>>,
        flow: Flow,
    ) -> Vec<(usize, Delivery)> {
        let model = flow.model();
        let orders: Vec<&str> = items
            .iter()
            .filter_map(|i| i.event.order.as_deref())
            .collect();
        let shipments = match self.order_shipments(&orders).await {
            Ok(shipments) => shipments,
            Err(e) => return fail_all(&items, e.delivery("searching customer shipments")),
        };
        let mut out = Vec::new();
        let mut jobs = Vec::new();
        let mut to_create = Vec::new();
        let mut to_extend: BTreeMap<i64, Extension> = BTreeMap::new();
        let mut extended: Vec<(usize, Date, i64, String)> = Vec::new();
        for item in &items {
            let Some(order) = item.event.order.as_deref() else {
                out.push((
                    item.idx,
                    Delivery::Permanent {
                        reason: format!("a {} event needs an order", item.event.kind),
                    },
                ));
                continue;
            };
            let label = format!("order {order}");
            let of_order = shipments.get(order).map(Vec::as_slice).unwrap_or_default();
            let live: Vec<&OrderShipment> =
                of_order.iter().filter(|s| s.state != "cancelled").collect();
            if live.is_empty() && !of_order.is_empty() {
                out.push((
                    item.idx,
                    Delivery::Permanent {
                        reason: format!(
                            "the customer shipment of order {order} is cancelled in Tryton \
                             ({model}/{})",
                            of_order[0].id
                        ),
                    },
                ));
                continue;
            }
            if let Some(shipment) = live.iter().find(|s| s.products.contains(&item.product.id)) {
                jobs.push(Job::found(
                    item,
                    shipment.id,
                    shipment.state.clone(),
                    &label,
                ));
                continue;
            }
            if let Some(closed) = &item.closed {
                out.push((item.idx, closed.clone()));
                continue;
            }
            let line = json!({
                "product": item.product.id,
                "unit": item.product.uom,
                "quantity": quantity(&item.event.qty.to_string()),
                "from_location": setup.output,
                "to_location": setup.customer.as_ref().map(|c| c.customer_location).ok(),
                "company": self.config.company,
                "unit_price": item.product.cost_price,
                "currency": setup.currency,
            });
            if let Some(open) = live
                .iter()
                .find(|s| matches!(s.state.as_str(), "draft" | "waiting" | "assigned"))
            {
                let mut line = line;
                if let Some(to) = open.customer_location {
                    line["to_location"] = json!(to);
                }
                if let Some(from) = open.output {
                    line["from_location"] = json!(from);
                }
                let entry = to_extend.entry(open.id).or_insert(Extension {
                    lines: Vec::new(),
                    rewait: open.state != "draft",
                    date: item.date,
                });
                entry.lines.push(line);
                entry.date = entry.date.max(item.date);
                extended.push((item.idx, item.date, open.id, label));
                continue;
            }
            let customer = match &setup.customer {
                Ok(customer) => customer,
                Err(why) => {
                    out.push((
                        item.idx,
                        Delivery::Permanent {
                            reason: format!(
                                "Tryton has no customer shipment for order {order} and none \
                                 can be created: {why}"
                            ),
                        },
                    ));
                    continue;
                }
            };
            to_create.push(Create::new(
                flow,
                item,
                json!({
                    "reference": order,
                    "company": self.config.company,
                    "customer": customer.id,
                    "delivery_address": customer.address,
                    "warehouse": setup.warehouse,
                    "warehouse_storage": item.location,
                    "warehouse_output": setup.output,
                    "outgoing_moves": [["create", [line]]],
                }),
            ));
        }

        if !to_extend.is_empty() {
            let mut params = Vec::new();
            for (id, extension) in &to_extend {
                let values = json!({"outgoing_moves": [["create", extension.lines]]});
                params.push(json!([id]));
                params.push(with_dates(values, flow.found_dates(extension.date)));
            }
            let rewait: Vec<i64> = to_extend
                .iter()
                .filter(|(_, extension)| extension.rewait)
                .map(|(id, _)| *id)
                .collect();
            let mut result = self.rpc.call(&format!("model.{model}.write"), params).await;
            if result.is_ok() && !rewait.is_empty() {
                result = self
                    .rpc
                    .call(&format!("model.{model}.wait"), vec![json!(rewait)])
                    .await;
            }
            match result {
                Ok(_) => {
                    for (idx, date, id, label) in extended {
                        let state = if rewait.contains(&id) {
                            "waiting"
                        } else {
                            "draft"
                        };
                        jobs.push(Job::dated(idx, date, id, state.into(), &label));
                    }
                }
                Err(e) => {
                    // Rare (one order per event, a few events): no per-record fallback.
                    for (idx, _, _, label) in extended {
                        out.push((
                            idx,
                            e.delivery(&format!("adding a line to the shipment of {label}")),
                        ));
                    }
                }
            }
        }
        self.create_jobs(model, to_create, &mut jobs, &mut out, "order")
            .await;
        out.extend(self.drive(flow, jobs).await);
        out
    }

    /// The customer shipments whose reference is one of these orders, oldest first, with the
    /// products of their outgoing moves that are not cancelled.
    async fn order_shipments(
        &self,
        orders: &[&str],
    ) -> Result<HashMap<String, Vec<OrderShipment>>, RpcError> {
        let found = self
            .rpc
            .call(
                "model.stock.shipment.out.search_read",
                vec![
                    json!([["reference", "in", orders]]),
                    json!(0),
                    Value::Null,
                    json!([["id", "ASC"]]),
                    json!([
                        "reference",
                        "state",
                        "outgoing_moves",
                        "customer_location",
                        "warehouse_output"
                    ]),
                ],
            )
            .await?;
        let move_ids: Vec<i64> = records(&found)
            .iter()
            .flat_map(|r| ids_field(r, "outgoing_moves"))
            .collect();
        let mut move_products: HashMap<i64, i64> = HashMap::new();
        if !move_ids.is_empty() {
            let moves = self
                .rpc
                .call(
                    "model.stock.move.read",
                    vec![json!(move_ids), json!(["product", "state"])],
                )
                .await?;
            for record in records(&moves) {
                if record.get("state").and_then(Value::as_str) == Some("cancelled") {
                    continue;
                }
                if let (Some(id), Some(product)) = (
                    record.get("id").and_then(Value::as_i64),
                    id_field(record, "product"),
                ) {
                    move_products.insert(id, product);
                }
            }
        }
        let mut by_order: HashMap<String, Vec<OrderShipment>> = HashMap::new();
        for record in records(&found) {
            let (Some(id), Some(reference), Some(state)) = (
                record.get("id").and_then(Value::as_i64),
                record.get("reference").and_then(Value::as_str),
                record.get("state").and_then(Value::as_str),
            ) else {
                return Err(RpcError::Request(
                    "a customer shipment came back without id, reference or state".into(),
                ));
            };
            let products = ids_field(record, "outgoing_moves")
                .filter_map(|m| move_products.get(&m).copied())
                .collect();
            by_order
                .entry(reference.to_string())
                .or_default()
                .push(OrderShipment {
                    id,
                    state: state.to_string(),
                    products,
                    customer_location: id_field(record, "customer_location"),
                    output: id_field(record, "warehouse_output"),
                });
        }
        Ok(by_order)
    }

    // ----- shared steps ----------------------------------------------------------------------

    /// Records of `model` whose `field` is one of the events' ids: event id → (id, state). A
    /// record that is not cancelled wins over a cancelled one.
    async fn find_by(
        &self,
        model: &str,
        field: &str,
        items: &[Prepared<'_>],
    ) -> Result<HashMap<String, (i64, String)>, RpcError> {
        let keys: Vec<&str> = items.iter().map(|i| i.event.id.as_str()).collect();
        let found = self
            .rpc
            .call(
                &format!("model.{model}.search_read"),
                vec![
                    json!([[field, "in", keys]]),
                    json!(0),
                    Value::Null,
                    json!([["id", "ASC"]]),
                    json!([field, "state"]),
                ],
            )
            .await?;
        let mut map: HashMap<String, (i64, String)> = HashMap::new();
        for record in records(&found) {
            let (Some(id), Some(key), Some(state)) = (
                record.get("id").and_then(Value::as_i64),
                record.get(field).and_then(Value::as_str),
                record.get("state").and_then(Value::as_str),
            ) else {
                return Err(RpcError::Request(format!(
                    "a {model} came back without id, {field} or state"
                )));
            };
            let keep = match map.get(key) {
                None => true,
                Some((_, old)) => old == "cancelled" && state != "cancelled",
            };
            if keep {
                map.insert(key.to_string(), (id, state.to_string()));
            }
        }
        Ok(map)
    }
}

struct OrderShipment {
    id: i64,
    state: String,
    products: HashSet<i64>,
    customer_location: Option<i64>,
    output: Option<i64>,
}

/// The lines a pick or ship adds to an open customer shipment of its order.
struct Extension {
    lines: Vec<Value>,
    /// Whether the shipment must be set back to waiting after (it was waiting or assigned).
    rewait: bool,
    date: Date,
}

fn fail_all(items: &[Prepared<'_>], delivery: Delivery) -> Vec<(usize, Delivery)> {
    items.iter().map(|i| (i.idx, delivery.clone())).collect()
}

fn malformed(what: &str) -> Delivery {
    Delivery::Permanent {
        reason: format!("Tryton returned {what} without the fields asked for"),
    }
}
