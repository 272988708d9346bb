using System.Net;
using System.Net.Http.Json;
using System.Text;
using System.Text.Json;
using System.Text.RegularExpressions;
using FineTune.Api.Infrastructure;
using FineTune.Domain.Tenants;
using Microsoft.AspNetCore.Authorization;
using Microsoft.AspNetCore.Routing;
using Microsoft.Extensions.DependencyInjection;

namespace FineTune.Api.Tests.Tenancy;

/// <summary>
/// Tenant isolation, tried on every endpoint the API maps: each route with an id is called by tenant B with tenant
/// A's ids and must answer 404 (admin routes: 403 for a member) and change nothing; B's lists are empty; A's own
/// calls on the same URLs succeed (so the ids were right). A new route with an unknown parameter fails this test
/// until it is added here.
/// </summary>
public sealed partial class IsolationTests(ApiFactory api) : IClassFixture<ApiFactory>
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    [GeneratedRegex(@"\{(\*\*)?(\w+)(:[^}]*)?\}")] private static partial Regex RouteParameter();

    [Fact]
    public async Task Every_endpoint_answers_404_to_another_tenants_ids_and_changes_nothing()
    {
        var a = await api.ClientAsync("iso-a", Roles.Member);
        var b = await api.ClientAsync("iso-b", Roles.Member);
        var job = (await (await a.PostAsync("/v1/fine-tunes", Requests.Body(Requests.Lora), Ct)).JsonAsync()).GetProperty("id").GetGuid();
        var adapter = await RegistryData.AddAsync(api, "iso-a", "secret-task", 1);
        Assert.True((await a.PutAsJsonAsync("/v1/adapters/tasks/secret-task/aliases/production", new { version = 1 }, Ct)).IsSuccessStatusCode);
        var hook = (await (await a.PostAsJsonAsync("/v1/webhooks", new { url = "https://hooks.example.com/a" }, Ct)).JsonAsync()).GetProperty("id").GetGuid();
        var delivery = (await (await a.PostAsync($"/v1/webhooks/{hook}/ping", null, Ct)).JsonAsync()).GetProperty("id").GetGuid();
        var tenantA = await api.TenantIdAsync("iso-a");

        string Value(string prefix, string name) => name switch
        {
            "id" when prefix.StartsWith("/v1/fine-tunes", StringComparison.Ordinal) => job.ToString(),
            "id" when prefix.StartsWith("/v1/adapters", StringComparison.Ordinal) => adapter.Id.ToString(),
            "id" when prefix.StartsWith("/v1/webhooks", StringComparison.Ordinal) => hook.ToString(),
            "id" when prefix.StartsWith("/v1/tenants", StringComparison.Ordinal) => tenantA.ToString(),
            "task" => "secret-task",
            "reference" or "alias" => "production",
            "path" => "lora/adapter_model.safetensors",
            "deliveryId" => delivery.ToString(),
            "keyId" => Guid.NewGuid().ToString(),
            "name" => "registered-model",
            _ => throw new Xunit.Sdk.XunitException($"IsolationTests does not know route parameter '{name}' of {prefix}: add a value for it"),
        };
        static string? Body(string? name) => name switch
        {
            "SetAdapterAlias" => """{"version": 1}""",
            "SetAdapterTags" => """{"tags": ["stolen"]}""",
            "UpdateWebhook" => """{"enabled": false}""",
            "SetTenantQuotas" => """{"maxRunningJobs": 0}""",
            "CreateTenantKey" => """{"role": "admin"}""",
            _ => null,
        };

        var endpoints = api.Services.GetRequiredService<EndpointDataSource>().Endpoints.OfType<RouteEndpoint>()
            .Where(e => e.RoutePattern.RawText?.StartsWith("/v1/", StringComparison.Ordinal) == true).ToList();
        Assert.True(endpoints.Count >= 30, $"only {endpoints.Count} endpoints found");
        var tried = 0;
        var ownGets = new List<string>();
        foreach (var e in endpoints)
        {
            var pattern = e.RoutePattern.RawText!;
            var method = e.Metadata.GetMetadata<HttpMethodMetadata>()!.HttpMethods.Single();
            var admin = e.Metadata.GetOrderedMetadata<IAuthorizeData>().Any(d => d.Policy == AuthPolicies.Admin);
            if (e.RoutePattern.Parameters.Count == 0 && !admin) continue; // collections: checked below
            var url = RouteParameter().Replace(pattern, m => Value(pattern, m.Groups[2].Value));
            var name = e.Metadata.GetMetadata<IEndpointNameMetadata>()?.EndpointName;
            var request = new HttpRequestMessage(new HttpMethod(method), url);
            if (method is "POST" or "PUT" or "PATCH")
                request.Content = new StringContent(Body(name) ?? "{}", Encoding.UTF8, "application/json");
            var response = await b.SendAsync(request, Ct);
            var expected = admin ? HttpStatusCode.Forbidden : HttpStatusCode.NotFound;
            Assert.True(response.StatusCode == expected,
                $"{method} {url} ({name}) as another tenant: {(int)response.StatusCode} {await response.Content.ReadAsStringAsync(Ct)}");
            Assert.Equal("application/problem+json", response.Content.Headers.ContentType?.MediaType);
            tried++;
            if (method == "GET" && !admin) ownGets.Add(url);
        }
        Assert.True(tried >= 25, $"only {tried} endpoints tried");

        // Tenant A's own calls on the same URLs work: the ids were the real ones.
        foreach (var url in ownGets)
        {
            var r = await a.GetAsync(url, Ct);
            Assert.True(r.IsSuccessStatusCode, $"GET {url} as the owner: {(int)r.StatusCode} {await r.Content.ReadAsStringAsync(Ct)}");
        }

        // Nothing of A's changed.
        var jobNow = await (await a.GetAsync($"/v1/fine-tunes/{job}", Ct)).JsonAsync();
        Assert.Equal("queued", jobNow.GetProperty("status").GetString());
        Assert.False(jobNow.GetProperty("cancelRequested").GetBoolean());
        var adapterNow = await (await a.GetAsync($"/v1/adapters/{adapter.Id}", Ct)).JsonAsync();
        Assert.Equal(JsonValueKind.Null, adapterNow.GetProperty("deletedAt").ValueKind);
        Assert.Equal(0, adapterNow.GetProperty("tags").GetArrayLength());
        Assert.Equal(["production"], adapterNow.GetProperty("aliases").EnumerateArray().Select(x => x.GetString()));
        Assert.True(Directory.Exists(Path.Combine(api.ArtifactRoot, adapter.Path)));
        Assert.True((await (await a.GetAsync($"/v1/webhooks/{hook}", Ct)).JsonAsync()).GetProperty("enabled").GetBoolean());
        Assert.Equal(1, (await (await a.GetAsync($"/v1/webhooks/{hook}/deliveries", Ct)).JsonAsync()).GetProperty("data").GetArrayLength());

        // B's collections show none of A's.
        foreach (var list in new[] { "/v1/fine-tunes", "/v1/adapters", "/v1/adapters?task=secret-task&includeDeleted=true" })
            Assert.Equal(0, (await (await b.GetAsync(list, Ct)).JsonAsync()).GetProperty("data").GetArrayLength());
        Assert.Equal(0, (await (await b.GetAsync("/v1/adapters/tasks", Ct)).JsonAsync()).GetArrayLength());
        Assert.Equal(0, (await (await b.GetAsync("/v1/webhooks", Ct)).JsonAsync()).GetArrayLength());
        Assert.Equal("iso-b", (await (await b.GetAsync("/v1/me", Ct)).JsonAsync()).GetProperty("tenant").GetProperty("name").GetString());
    }

    [Fact]
    public async Task Swagger_documents_every_endpoint_with_a_summary_and_examples()
    {
        var doc = JsonDocument.Parse(await api.CreateClient().GetStringAsync("/swagger/v1/swagger.json", Ct)).RootElement;
        var operations = 0;
        foreach (var path in doc.GetProperty("paths").EnumerateObject())
            foreach (var op in path.Value.EnumerateObject())
            {
                var where = $"{op.Name.ToUpperInvariant()} {path.Name}";
                operations++;
                Assert.True(op.Value.TryGetProperty("summary", out var summary) && summary.GetString()!.Length > 5, $"{where}: no summary");
                if (op.Value.TryGetProperty("requestBody", out var body) && body.GetProperty("content").TryGetProperty("application/json", out var req))
                    Assert.True(req.TryGetProperty("example", out _) || req.TryGetProperty("examples", out _), $"{where}: no request example");
                foreach (var response in op.Value.GetProperty("responses").EnumerateObject().Where(r => r.Name.StartsWith('2')))
                    if (response.Value.TryGetProperty("content", out var content) && content.TryGetProperty("application/json", out var json))
                        Assert.True(json.TryGetProperty("example", out _), $"{where} {response.Name}: no response example");
            }
        Assert.True(operations >= 35, $"{operations} operations");
        foreach (var p in new[] { "/v1/tenants", "/v1/tenants/{id}/keys", "/v1/audit", "/v1/me", "/v1/webhooks", "/v1/webhooks/{id}/deliveries",
                     "/v1/adapters/{task}@{reference}", "/v1/adapters/{id}/files/{path}", "/v1/adapters/tasks/{task}/aliases/{alias}" })
            Assert.True(doc.GetProperty("paths").TryGetProperty(p, out _), $"missing {p}");
    }
}
