import requests

API_KEY = "rbtk_xxx"
BASE = "https://api.roboticks.io/api/v1"

headers = {"Authorization": f"Bearer {API_KEY}"}

# List completed sessions
sessions = requests.get(
    f"{BASE}/organizations/acme/projects/warehouse/sessions",
    headers=headers,
    params={"status": "completed", "since": "2025-01-01T00:00:00Z"}
).json()["items"]

# Get logs for a session
logs = requests.get(
    f"{BASE}/organizations/acme/projects/warehouse/sessions/456/logs",
    headers=headers,
    params={"level": "error", "limit": 50}
).json()["items"]

# Download artifact
response = requests.get(
    f"{BASE}/organizations/acme/projects/warehouse/sessions/456/files/logs/session.log",
    headers=headers
)
with open("session.log", "wb") as f:
    f.write(response.content)
